"""PipelineModel.save / keras.models.load_model / export: the .keras round trip continues training exactly.

Each test compares with the unsplit Keras model or with the same pipeline trained without saving.
"""

import json
import os
import subprocess
import sys
import warnings
import zipfile
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf

import pipeline
from modelzoo import cnn, data, loss
from pipeline.core import saving
from pipeline.core import schedule as sched
from pipeline.errors import SettingError

ROOT = Path(__file__).resolve().parents[1]
STEPS = 2
"""N: mini-batches before and after saving (batch 8 over 16 samples: one epoch)."""


def _copy(model: keras.Model) -> keras.Model:
    twin = keras.models.clone_model(model)
    twin.set_weights(model.get_weights())
    return twin


def _compile(model: keras.Model) -> None:
    model.compile(keras.optimizers.Adam(1e-2), loss(), metrics=["accuracy"])


def _fit(model: keras.Model, x, y) -> None:
    model.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0)


def _assert_same(got: list, want: list, atol: float = 0.0) -> None:
    assert len(got) == len(want)
    for a, b in zip(got, want):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=atol)


def _run(code: str, env_drop: tuple = ("PIPELINE_CPU_DEVICES",)) -> str:
    env = {k: v for k, v in os.environ.items() if k not in env_drop}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300, cwd="/")
    assert out.returncode == 0, out.stdout + out.stderr
    return out.stdout + out.stderr


def _two_inputs() -> keras.Model:
    a, b = keras.Input((3,), name="a"), keras.Input((2,), name="b")
    h = keras.layers.Concatenate(name="cat")([a, b])
    h = keras.layers.Dense(8, activation="tanh", name="d1")(h)
    h = keras.layers.Dense(8, activation="relu", name="d2")(h)
    return keras.Model([a, b], keras.layers.Dense(4, name="out")(h), name="two_in")


def _two_input_data(n: int = 16):
    rng = np.random.default_rng(3)
    x = [rng.normal(size=(n, 3)).astype("float32"), rng.normal(size=(n, 2)).astype("float32")]
    return x, rng.integers(0, 4, size=n).astype("int32")


def test_keras_round_trip_config_predictions_and_exact_continuation(tmp_path):
    """Save after N steps, load without custom_objects, train N more: equals 2N steps without saving, bit for bit."""
    model = cnn()
    reference = _copy(model)
    piped = pipeline.PipelineModel(pipeline.split(model, cuts=["conv_b", "flatten"]), devices="auto",
                                   microbatches=2, schedule="gpipe", recompute=[False, True, False])
    x, y = data("cnn", n=16)
    _compile(piped)
    _fit(piped, x, y)
    config = piped.get_config()
    assert (config["devices"], config["microbatches"], config["schedule"]) == ("auto", 2, "gpipe")
    assert config["recompute"] == [False, True, False] and len(config["stages"]) == 3
    path = str(tmp_path / "m.keras")
    piped.save(path)
    saved = json.loads(zipfile.ZipFile(path).read("config.json"))
    assert saved["registered_name"] == "pipeline>PipelineModel"
    loaded = keras.models.load_model(path)  # no custom_objects
    assert isinstance(loaded, pipeline.PipelineModel)
    assert json.loads(json.dumps(loaded.get_config())) == json.loads(json.dumps(config))  # tuples: lists
    assert [s.device for s in loaded.stages] == [s.device for s in piped.stages]
    assert [s.recompute for s in loaded.stages] == [False, True, False]
    assert int(loaded.optimizer.iterations) == STEPS and loaded.compiled
    np.testing.assert_array_equal(loaded.predict(x, verbose=0), piped.predict(x, verbose=0))
    _fit(loaded, x, y)
    _fit(piped, x, y)
    _assert_same(loaded.get_weights(), piped.get_weights())
    _assert_same([v.numpy() for v in loaded.optimizer.variables], [v.numpy() for v in piped.optimizer.variables])
    _compile(reference)  # the unsplit model, 2N steps: equal to float rounding
    for _ in range(2):
        _fit(reference, x, y)
    _assert_same(loaded.get_weights(), reference.get_weights(), atol=2e-5)


def test_load_in_a_fresh_process_with_two_devices_continues_exactly(tmp_path):
    """A 4-device process saves an "auto" model and the same pinned to /CPU:2, /CPU:3; a fresh process (no
    PIPELINE_CPU_DEVICES, pipeline imported before keras) loads both on 2 devices: the auto one trains on
    exactly as the saving process does, the pinned one falls back to "auto" with a warning."""
    x, y = data("cnn", n=16)
    piped = pipeline.PipelineModel(pipeline.split(cnn(), cuts=["flatten"]), microbatches=2)
    _compile(piped)
    _fit(piped, x, y)
    files = {kind: str(tmp_path / f"{kind}.keras") for kind in ("auto", "pinned")}
    piped.save(files["auto"])
    with saving.devices_on_load(["/CPU:2", "/CPU:3"]):
        pinned = keras.models.load_model(files["auto"])
    assert pinned.get_config()["devices"] == ["/CPU:2", "/CPU:3"]
    pinned.save(files["pinned"])
    expected = {"pinned": piped.get_weights()}
    _fit(piped, x, y)
    expected["auto"] = piped.get_weights()
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "y.npy", y)
    code = f"""
import sys, warnings
import pipeline
assert "keras" not in sys.modules
import keras, numpy as np, tensorflow as tf
tf.config.experimental.enable_op_determinism()
x, y = np.load({str(tmp_path / 'x.npy')!r}), np.load({str(tmp_path / 'y.npy')!r})
for kind, path in {files!r}.items():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = keras.models.load_model(path)
    print(kind, [s.device for s in model.stages], [str(w.message) for w in caught if "devices=" in str(w.message)])
    if kind == "auto":
        model.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0)
    np.savez({str(tmp_path)!r} + "/" + kind + ".npz", *model.get_weights())
print("cpus", len(tf.config.list_logical_devices("CPU")))
"""
    out = _run(code)
    assert "cpus 2" in out
    assert "auto ['/device:CPU:0', '/device:CPU:1'] []" in out
    fallback = "pinned ['/device:CPU:0', '/device:CPU:1'] [\"the saved PipelineModel was placed on devices=['/CPU:2',"
    assert fallback in out
    assert "devices_on_load" in out
    for kind in files:
        got = np.load(tmp_path / f"{kind}.npz")
        _assert_same([got[f"arr_{i}"] for i in range(len(got.files))], expected[kind], atol=1e-6)


def test_model_checkpoint_full_model_files_load(tmp_path):
    x, y = data("cnn", n=16)
    piped = pipeline.PipelineModel(pipeline.split(cnn(), cuts=["flatten"]), devices="cpu", microbatches=4)
    _compile(piped)
    path = str(tmp_path / "ckpt-{epoch}.keras")
    piped.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0,
              callbacks=[keras.callbacks.ModelCheckpoint(path, save_weights_only=False)])
    loaded = keras.models.load_model(str(tmp_path / "ckpt-1.keras"))
    assert loaded.microbatches == 4 and loaded.get_config()["devices"] == "cpu"
    assert int(loaded.optimizer.iterations) == STEPS
    _assert_same(loaded.get_weights(), piped.get_weights())
    _assert_same([v.numpy() for v in loaded.optimizer.variables], [v.numpy() for v in piped.optimizer.variables])


def test_multi_input_split_functional_round_trip(tmp_path):
    """A two-input functional model cut by split(): stage 0 takes [a, b]; the loaded pipeline predicts and
    trains like the original, and the original like the unsplit model."""
    model = _two_inputs()
    reference = _copy(model)
    piped = pipeline.PipelineModel(pipeline.split(model, cuts=["d1"]), devices=["/CPU:1", "/CPU:0"], microbatches=2)
    x, y = _two_input_data()
    for m in (piped, reference):
        m.compile(keras.optimizers.SGD(0.1, momentum=0.9), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        _fit(m, x, y)
    path = str(tmp_path / "two.keras")
    piped.save(path)
    loaded = keras.models.load_model(path)
    assert [s.device for s in loaded.stages] == ["/CPU:1", "/CPU:0"]
    assert loaded.get_config()["devices"] == ["/CPU:1", "/CPU:0"]
    np.testing.assert_array_equal(loaded.predict(x, verbose=0), piped.predict(x, verbose=0))
    for m in (loaded, piped, reference):
        _fit(m, x, y)
    _assert_same(loaded.get_weights(), piped.get_weights())
    _assert_same(loaded.get_weights(), reference.get_weights(), atol=1e-5)


def test_export_serves_the_merged_model_without_the_package(tmp_path):
    """SavedModels of a 3-stage CNN and a two-input model serve in a process where pipeline cannot be imported,
    on one CPU device, and no op or variable is pinned to the stages' logical devices."""
    x, _ = data("cnn", n=16)
    cnn_model = cnn()
    unsplit = _copy(cnn_model)
    piped = pipeline.PipelineModel(pipeline.split(cnn_model, cuts=["conv_b", "flatten"]), devices=["/CPU:1", "/CPU:2",
                                                                                                  "/CPU:3"])
    piped.export(str(tmp_path / "cnn"), verbose=False)
    two = pipeline.PipelineModel(pipeline.split(_two_inputs(), cuts=["d1"]), devices=["/CPU:3", "/CPU:2"],
                                 microbatches=2)
    xs, _ = _two_input_data()
    two.export(str(tmp_path / "two"), verbose=False)
    for name in ("cnn", "two"):
        graph = (tmp_path / name / "saved_model.pb").read_bytes()
        assert not any(f"CPU:{i}".encode() in graph for i in (1, 2, 3)), name
    np.save(tmp_path / "x.npy", x)
    np.savez(tmp_path / "xs.npz", *xs)
    code = f"""
import sys
sys.modules["pipeline"] = None  # the package cannot be imported
import numpy as np, tensorflow as tf
d = {str(tmp_path)!r}
assert len(tf.config.list_logical_devices("CPU")) == 1
served_cnn, served_two = tf.saved_model.load(d + "/cnn"), tf.saved_model.load(d + "/two")
np.save(d + "/cnn_out.npy", served_cnn.serve(np.load(d + "/x.npy")).numpy())
xs = np.load(d + "/xs.npz")
np.save(d + "/two_out.npy", served_two.serve([xs["arr_0"], xs["arr_1"]]).numpy())
print("served")
"""
    assert "served" in _run(code)
    np.testing.assert_allclose(np.load(tmp_path / "cnn_out.npy"), piped.predict(x, verbose=0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.load(tmp_path / "cnn_out.npy"), unsplit.predict(x, verbose=0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.load(tmp_path / "two_out.npy"), two.predict(xs, verbose=0), rtol=1e-5, atol=1e-6)


def _custom_schedule(num_stages, num_microbatches):
    return sched.gpipe(num_stages, num_microbatches)


def test_custom_schedule_callable_is_refused_at_save_and_a_known_generator_is_saved_by_name(tmp_path):
    stages = pipeline.split(cnn(), cuts=["flatten"])
    piped = pipeline.PipelineModel(stages, devices="cpu", microbatches=2, schedule=_custom_schedule)
    path = tmp_path / "custom.keras"
    with pytest.raises(SettingError, match=r"schedule: got the custom callable '_custom_schedule'.*1f1b.*gpipe.*"
                                           r"save_weights"):
        piped.save(str(path))
    by_function = pipeline.PipelineModel(stages, devices="cpu", microbatches=2, schedule=sched.one_f_one_b)
    assert by_function.get_config()["schedule"] == "1f1b"


def test_reducer_warning_export_format_and_old_config_errors(tmp_path):
    stages = pipeline.split(cnn(), cuts=["flatten"])
    piped = pipeline.PipelineModel(stages, devices="cpu", gradient_reducer=lambda grads, variables: grads)
    with pytest.warns(UserWarning, match="gradient_reducer is a Python callable and is not saved"):
        config = piped.get_config()
    assert "gradient_reducer" not in config
    with pytest.raises(SettingError, match=r"format='onnx' is not supported.*tf_saved_model"):
        piped.export(str(tmp_path / "x"), format="onnx")
    with pytest.raises(SettingError, match="has no 'stages'.*load_weights"):
        pipeline.PipelineModel.from_config({"name": "old"})


def test_batchnorm_check_numerics_round_trip_and_devices_on_load_overrides_the_saved_devices(tmp_path):
    piped = pipeline.PipelineModel(pipeline.split(cnn(), cuts=["flatten"]), devices=["/CPU:0", "/CPU:1"],
                                   batchnorm="deferred", check_numerics=True)
    assert (piped.get_config()["batchnorm"], piped.get_config()["check_numerics"]) == ("deferred", True)
    path = str(tmp_path / "m.keras")
    piped.save(path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the saved devices exist here: no fallback warning
        loaded = keras.models.load_model(path)
    assert [s.device for s in loaded.stages] == ["/CPU:0", "/CPU:1"]
    assert (loaded.batchnorm_control.mode, loaded.check_numerics) == ("deferred", True)
    with saving.devices_on_load(["/CPU:3", "/CPU:2"]):
        moved = keras.models.load_model(path)
    assert [s.device for s in moved.stages] == ["/CPU:3", "/CPU:2"]
    assert all(v.value.device.endswith("CPU:3") for v in moved.stage_layers[0].variables)
    x, _ = data("cnn", n=4)
    np.testing.assert_array_equal(moved.predict(x, verbose=0), piped.predict(x, verbose=0))
