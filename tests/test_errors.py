"""Bad input gets a clear error before any compute: one test per rejected input."""

import keras
import numpy as np
import pytest

import pipeline
from modelzoo import BUILDERS, data, loss
from pipeline.core import devices
from pipeline.core.partition import SplitError


def two_stages():
    return pipeline.split(BUILDERS["cnn"][0](), cuts=["flatten"])


def test_unknown_schedule():
    with pytest.raises(ValueError, match=r"unknown schedule 'zigzag'; known schedules: 1f1b, gpipe"):
        pipeline.PipelineModel(two_stages(), schedule="zigzag")


def test_cut_layer_not_found():
    with pytest.raises(SplitError, match=r"cut layer 'nope' is not a layer of model 'cnn'; its layers are: conv_a, "):
        pipeline.split(BUILDERS["cnn"][0](), cuts=["nope"])


def test_cut_that_two_tensors_cross_carries_both():
    """Once refused ("also crossing: d1 output"): the boundary now carries d1 and d2, and the stages chain."""
    model = BUILDERS["residual"][0]()
    first, second = pipeline.split(model, cuts=["d2"])
    assert [t.producer for t in pipeline.boundaries([first, second])[0].tensors] == ["d1", "d2"]
    x = np.random.default_rng(0).normal(size=(4, *model.inputs[0].shape[1:])).astype("float32")
    np.testing.assert_allclose(second(first(x)), model(x), rtol=1e-6, atol=1e-6)


def test_cuts_out_of_order():
    with pytest.raises(SplitError, match=r"cuts must follow the model's layer order: 'conv_a' comes before"):
        pipeline.split(BUILDERS["cnn"][0](), cuts=["flatten", "conv_a"])


def test_more_stages_than_gpus():
    with pytest.raises(devices.DeviceError, match=r"3 stages need 3 GPUs, but this machine has 0"):
        devices.resolve(3, "gpu")


def test_more_stages_than_cpu_devices_after_tf_started():
    with pytest.raises(devices.DeviceError,
                       match=r"needs 6 logical CPU devices, but TensorFlow already initialized its devices "
                             r"with 4.*PIPELINE_CPU_DEVICES=6"):
        devices.resolve(6)


def test_explicit_devices_wrong_count():
    with pytest.raises(devices.DeviceError, match=r"devices lists 3 device\(s\) .* for 2 stage\(s\).*D divides"):
        pipeline.PipelineModel(two_stages(), devices=["/CPU:0", "/CPU:1", "/CPU:2"])


def test_fewer_devices_than_stages_are_used_round_robin():
    """D devices for K stages (D divides K): stage s on devices[s % D] (virtual stages)."""
    import keras

    def four():
        return [keras.Sequential([keras.Input((8,)), keras.layers.Dense(8)]) for _ in range(4)]

    model = pipeline.PipelineModel(four(), devices=["/CPU:0", "/CPU:1"])
    assert [s.device for s in model.stages] == ["/CPU:0", "/CPU:1", "/CPU:0", "/CPU:1"]
    auto = pipeline.PipelineModel(four(), virtual_stages=2)
    assert [s.device for s in auto.stages][2:] == [s.device for s in auto.stages][:2]
    with pytest.raises(devices.DeviceError, match=r"virtual_stages=3 does not divide the 4 stage\(s\)"):
        pipeline.PipelineModel(four(), virtual_stages=3)


def test_explicit_unknown_device():
    with pytest.raises(devices.DeviceError, match=r"device '/GPU:7' is not a device of this process"):
        pipeline.PipelineModel(two_stages(), devices=["/CPU:0", "/GPU:7"])


def test_explicit_devices_may_repeat():
    model = pipeline.PipelineModel(two_stages(), devices=["/CPU:1", "/CPU:1"])
    assert [s.device for s in model.stages] == ["/CPU:1", "/CPU:1"]


@pytest.mark.parametrize("value", [0, -1, 2.5, "4"])
def test_microbatches_below_one_or_not_int(value):
    with pytest.raises(ValueError, match=r"microbatches must be an integer >= 1, got"):
        pipeline.PipelineModel(two_stages(), microbatches=value)


def test_stage_output_shape_not_accepted_by_next_stage():
    m0 = keras.Sequential([keras.Input((6,)), keras.layers.Dense(5)], name="model_0")
    m1 = keras.Sequential([keras.Input((7,)), keras.layers.Dense(2)], name="model_1")
    with pytest.raises(ValueError, match=r"stage 1 \('model_1'\) expects input shape \(None, 7\), but stage 0 "
                                         r"\('model_0'\) outputs shape \(None, 5\)"):
        pipeline.PipelineModel([m0, m1])


def test_unbuilt_stage_mismatch_named_at_build():
    m0 = keras.Sequential([keras.layers.Reshape((2, 3))], name="model_0")
    m1 = keras.Sequential([keras.layers.Conv2D(2, 3)], name="model_1")
    model = pipeline.PipelineModel([m0, m1])
    with pytest.raises(ValueError, match=r"stage 1 \('model_1'\) does not accept the output of stage 0 "
                                         r"\('model_0'\): stage 0 outputs shape \(None, 2, 3\)"):
        model.build((None, 6))


def test_stages_must_be_keras_layers():
    with pytest.raises(TypeError, match=r"stage 1 is a str, not a Keras model or layer"):
        pipeline.PipelineModel([keras.layers.Dense(2), "model_1"])


def test_single_model_instead_of_list():
    with pytest.raises(TypeError, match=r"stages must be a list of Keras models or layers.*pipeline.split"):
        pipeline.PipelineModel(BUILDERS["cnn"][0]())


def test_compile_without_loss():
    model = pipeline.PipelineModel(two_stages())
    model.compile("sgd")
    x, y = data("cnn", n=4)
    with pytest.raises(ValueError, match=r"no loss: call compile\(loss=...\)"):
        model.fit(x, y, verbose=0)


def test_jit_compile_true_rejected():
    model = pipeline.PipelineModel(two_stages())
    with pytest.raises(ValueError, match=r"jit_compile=True is not supported by PipelineModel: XLA compiles"):
        model.compile("sgd", loss(), jit_compile=True)
    model.compile("sgd", loss())
    assert model.jit_compile is False


def test_cli_prints_error_without_traceback(capsys):
    from pipeline import cli

    code = cli.main(["demo", "--schedule", "zigzag", "--epochs", "1"])
    err = capsys.readouterr().err
    assert code == 2
    assert "unknown schedule 'zigzag'" in err and "Traceback" not in err


def test_microbatch_split_policy():
    from pipeline.core import microbatch

    assert microbatch.sizes(10, 4) == [3, 3, 2, 2]
    parts = microbatch.split({"a": np.arange(10), "b": None}, 4)
    assert [len(p["a"]) for p in parts] == [3, 3, 2, 2] and parts[0]["b"] is None
    np.testing.assert_array_equal(microbatch.merge([p["a"] for p in parts]), np.arange(10))
