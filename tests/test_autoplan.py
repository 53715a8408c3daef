"""``schedule/microbatches/recompute="auto"``: the choice on fixed costs, and its wiring (PipelineModel, YAML, CLI).

The choice logic is checked against the simulator by brute force on fixed :class:`StageCost` tables (no
timing); the wiring trains an auto model and compares it with the unsplit Keras model.
"""

import dataclasses
import json

import keras
import numpy as np
import pytest

import pipeline
from pipeline.core import schedule as sched
from pipeline.errors import ConfigError, SettingError
from pipeline.perf import autoplan
from pipeline.perf import autoplan_measure
from pipeline.perf import simulate as sim
from pipeline.perf.simulate import StageCost
from pipeline.train import config as config_lib
from pipeline.train import runner

K, B = 2, 16
TWO = ["gpipe", "1f1b"]


@pytest.fixture(autouse=True)
def _quick_timing(monkeypatch):
    """The tests check the wiring, not the timings: one short timed loop per stage and M."""
    monkeypatch.setattr(autoplan_measure, "MEASURE", {"repeats": 1, "calls": 1, "rounds": 1})
    monkeypatch.setattr(autoplan_measure, "REFINE", {"top": 2, "within": 0.25, "steps": 1, "rounds": 1})
    monkeypatch.setattr(autoplan, "DEFAULT_MICROBATCHES", (1, 2, 4))


def _profile(costs=None, activation=(1000, 1000), inputs=(10, 10), static=(5000, 5000)):
    """Per-micro-batch costs with a fixed per-action part 0.5 plus work proportional to the rows."""
    costs = costs or {m: [StageCost(0.5 + 8 / m, 0.5 + 16 / m)] * K for m in (1, 2, 4, 8, 16)}
    return autoplan.Profile(B, costs, list(activation), list(inputs), list(static))


def _brute_force(profile, names, recompute=(False, True)):
    """(step, M, recompute) of every candidate, straight from the simulator."""
    out = {}
    for name in names:
        for m, costs in profile.costs.items():
            for flag in recompute:
                c = [StageCost(s.forward, s.backward + (s.forward if flag else 0.0)) for s in costs]
                out[(name, m, flag)] = sim.simulate(sched.get(name)(K, m), c).makespan
    return out


# ----------------------------------------------------------------------------- the choice on fixed costs

def test_chooses_the_fastest_simulated_plan_and_names_the_runner_up():
    profile = _profile()
    choice = autoplan.choose(profile, schedules=TWO)
    steps = _brute_force(profile, TWO)
    ranked = sorted(steps.items(), key=lambda kv: (kv[1], kv[0][1], kv[0][2]))
    assert (choice.schedule, choice.microbatches, choice.recompute) in [k for k, v in ranked if v == ranked[0][1]]
    assert choice.step == pytest.approx(ranked[0][1])
    # (M+K-1)(f+b) for both schedules on uniform stages: 1f1b and gpipe tie, 1f1b keeps less memory
    m = choice.microbatches
    assert choice.step == pytest.approx((m + K - 1) * (1.0 + 24 / m))
    assert choice.schedule == "1f1b" and choice.runner_up.schedule == "gpipe"
    assert choice.runner_up.step == pytest.approx(choice.step)
    assert choice.runner_up.peak_bytes > choice.peak_bytes
    assert len(choice.table) == len(steps)
    assert [c.step for c in choice.table] == sorted(c.step for c in choice.table)
    assert autoplan.choose(profile, schedules=TWO) == choice  # deterministic given costs


def test_peak_memory_per_device_follows_the_schedule():
    profile = _profile(activation=(1000, 3000), inputs=(10, 100), static=(5000, 7000))
    rows = B // 4
    gpipe = autoplan.device_peaks(sched.gpipe(K, 4), profile, rows, recompute=False)
    one_f = autoplan.device_peaks(sched.one_f_one_b(K, 4), profile, rows, recompute=False)
    again = autoplan.device_peaks(sched.one_f_one_b(K, 4), profile, rows, recompute=True)
    assert gpipe == [5000 + 4 * rows * 1010, 7000 + 4 * rows * 3100]  # GPipe keeps all M micro-batches
    assert one_f == [5000 + 2 * rows * 1010, 7000 + 1 * rows * 3100]  # 1F1B: at most K - i on stage i
    assert again == [5000 + 2 * rows * 10 + rows * 1000, 7000 + rows * 100 + rows * 3000]  # inputs + one rerun


def test_split_stages_hold_their_layer_output_gradients_from_b_to_w():
    # zb_h1 (K=2, M=4) rows: 0F0 0F1 0B0 0W0 0F2 0B1 0W1 ... and 1F0 1B0 1F1 1B1 1W0 1F2 1B2 1W1 ...
    held = dataclasses.replace(_profile(activation=(1000, 3000), inputs=(10, 100), static=(5000, 7000)),
                               held_bytes=(400, 700))
    rows = B // 4
    peaks = autoplan.device_peaks(sched.zb_h1(K, 4), held, rows, recompute=False)
    assert peaks == [5000 + rows * (2 * 1010 + 400), 7000 + rows * (2 * 3100 + 2 * 700)]
    without = dataclasses.replace(held, held_bytes=None)
    assert autoplan.device_peaks(sched.zb_h1(K, 4), without, rows, recompute=False) == [
        5000 + rows * 2 * 1010, 7000 + rows * 2 * 3100]
    # recomputed split stages take W from a second walk of the tape: nothing held beside the inputs
    assert (autoplan.device_peaks(sched.zb_h1(K, 4), held, rows, recompute=True)
            == autoplan.device_peaks(sched.zb_h1(K, 4), without, rows, recompute=True))
    assert autoplan.device_peaks(sched.one_f_one_b(K, 4), held, rows, recompute=False) == autoplan.device_peaks(
        sched.one_f_one_b(K, 4), without, rows, recompute=False)


def test_held_bytes_are_the_layer_calls_outputs_or_zero_where_w_walks_the_tape_again():
    x = np.zeros((3, 5), np.float32)
    functional = keras.Sequential([keras.Input((5,)), keras.layers.Dense(7), keras.layers.Dense(2)])
    assert autoplan_measure._held_bytes(functional, x) == 4 * (7 + 2)

    class Subclassed(keras.Model):
        def __init__(self):
            super().__init__()
            self.dense = keras.layers.Dense(7)

        def call(self, t):
            return self.dense(t)

    assert autoplan_measure._held_bytes(Subclassed(), x) == 0


def test_budget_drops_plans_that_do_not_fit():
    profile = _profile(activation=(200_000, 200_000))
    free = autoplan.choose(profile, schedules=TWO)
    budget = free.peak_bytes - 1
    choice = autoplan.choose(profile, budget=budget, schedules=TWO)
    assert choice.peak_bytes <= budget and choice.best.fits
    assert choice.step >= free.step
    for c in choice.table:
        assert c.fits == (c.peak_bytes <= budget)
    assert any(not c.fits for c in choice.table)
    assert all(c.fits for c in choice.table[: sum(c.fits for c in choice.table)])  # fitting ones first


def test_ties_prefer_fewer_microbatches_then_no_recompute():
    # (M+K-1)(f+b): M=1 -> 2 * 3 = 6, M=2 -> 3 * 2 = 6; forward 0 makes recompute free
    costs = {1: [StageCost(0.0, 3.0)] * K, 2: [StageCost(0.0, 2.0)] * K}
    choice = autoplan.choose(_profile(costs), schedules=["1f1b"])
    assert (choice.microbatches, choice.recompute) == (1, False)
    assert choice.runner_up.microbatches == 1 and choice.runner_up.recompute is True
    assert choice.runner_up.step == pytest.approx(choice.step) == pytest.approx(6.0)


def test_no_plan_fits_names_the_smallest_need():
    profile = _profile()
    table, _ = autoplan.simulate_candidates(profile, TWO)
    least = min(c.peak_bytes for c in table)
    with pytest.raises(SettingError, match=rf"memory_budget: .*smallest need is .*\({least} bytes\).*by 1f1b M=\d+ "
                                           r"recompute.*Raise memory_budget"):
        autoplan.choose(profile, budget=least - 1, schedules=TWO)
    assert autoplan.choose(profile, budget=least, schedules=TWO).peak_bytes == least


def test_interleaved_only_with_more_stages_than_devices():
    costs = {m: [StageCost(1 / m, 2 / m)] * 4 for m in (2, 4)}
    four = autoplan.Profile(8, costs, [10] * 4, [1] * 4, [0] * 4)
    table, skipped = autoplan.simulate_candidates(four)
    assert "interleaved_1f1b" not in {c.schedule for c in table}
    assert any(s.startswith("interleaved_1f1b") for s in skipped)
    shared = autoplan.Profile(8, costs, [10] * 4, [1] * 4, [0] * 4, stage_devices=[0, 1, 0, 1])
    table, _ = autoplan.simulate_candidates(shared, ["interleaved_1f1b"])
    assert {c.schedule for c in table} == {"interleaved_1f1b"} and all(len(c.device_bytes) == 2 for c in table)
    table, _ = autoplan.simulate_candidates(shared, ["1f1b"], recompute=(False,))
    for c in table:  # a device runs its two stages one after the other: at least their summed work
        assert c.step >= 2 * c.microbatches * (3 / c.microbatches) - 1e-12 and len(c.device_bytes) == 2


def test_devices_that_share_cores_are_simulated_with_their_alone_costs():
    # Under load a half batch costs what the whole batch costs alone (both devices on the same cores); alone it
    # costs 0.4 of it. As separate devices M=1 wins (6 vs 9); with the shared cores modelled M=2 does (5.4).
    loaded = {1: [StageCost(1, 2)] * 2, 2: [StageCost(1, 2)] * 2}
    alone = {1: loaded[1], 2: [StageCost(0.4, 0.8)] * 2}
    apart = autoplan.Profile(8, loaded, [10] * 2, [1] * 2, [0] * 2)
    shared = dataclasses.replace(apart, alone_costs=alone)
    assert autoplan.choose(apart, schedules=["1f1b"], recompute=(False,)).microbatches == 1
    assert autoplan.choose(shared, schedules=["1f1b"], recompute=(False,)).microbatches == 2
    table, _ = autoplan.simulate_candidates(shared, ["1f1b"], recompute=(False, True))
    for c in table:
        extra = 1.0 if c.recompute else 0.0  # a recomputed stage pays its forward again, alone or loaded
        costs, lone = ([StageCost(s.forward, s.backward + s.forward * extra) for s in t[c.microbatches]]
                       for t in (loaded, alone))
        assert c.step == pytest.approx(sim.simulate(sched.one_f_one_b(2, c.microbatches), costs, alone=lone).makespan)
    assert min(c.step for c in table if c.microbatches == 2) == pytest.approx(5.4)


@pytest.mark.parametrize("devices, shared", [
    (["/CPU:0", "/CPU:1"], True), (["/job:localhost/replica:0/task:0/device:CPU:0", "/CPU:1"], True),
    (["/CPU:0"], False), (["/GPU:0", "/GPU:1"], False), (["/CPU:0", "/GPU:0"], False),
    (["/job:worker/task:0/device:CPU:0", "/job:worker/task:1/device:CPU:0"], False)])
def test_logical_cpu_devices_of_one_task_share_compute(devices, shared):
    assert autoplan_measure.shares_compute(devices) is shared


def test_measured_profile_times_stages_alone_too_where_devices_share_cores():
    keras.utils.set_random_seed(0)
    parts = [keras.Sequential([keras.Input((6,)), keras.layers.Dense(8, activation="relu")]),
             keras.Sequential([keras.Input((8,)), keras.layers.Dense(3)])]
    model = pipeline.PipelineModel(parts, devices=["/CPU:0", "/CPU:1"], microbatches=2, schedule="zb_h1")
    model.compile(optimizer="sgd", loss="mse")
    x = np.ones((8, 6), "float32")
    model.fit(x, np.ones((8, 3), "float32"), batch_size=8, epochs=1, verbose=0)
    profile = autoplan_measure.measure_profile(model.stages, x, [1, 2], repeats=1, calls=1, shared=True)
    assert sorted(profile.alone_costs) == sorted(profile.alone_split_costs) == [1, 2]
    assert profile.alone_costs[1] == profile.costs[1]  # one micro-batch: timed alone in both
    assert all(c.forward > 0 and c.weight is not None for c in profile.alone_split_costs[2])
    apart = autoplan_measure.measure_profile(model.stages, x, [2], repeats=1, calls=1)
    assert apart.alone_costs is None and apart.alone_split_costs is None


@pytest.mark.parametrize("value, parsed", [(1000, ("bytes", 1000.0)), ("80%", ("percent", 80.0)),
                                           ("2GB", ("bytes", 2e9)), ("512MiB", ("bytes", 512 * 2**20)),
                                           (None, None)])
def test_memory_budget_values(value, parsed):
    assert autoplan.parse_budget(value) == parsed


@pytest.mark.parametrize("value", [0, -5, "150%", "lots", True, "0%"])
def test_bad_memory_budget_is_refused(value):
    with pytest.raises(SettingError, match=r"memory_budget: got .*(give bytes|share must be)"):
        autoplan.parse_budget(value)


def test_budget_share_of_device_memory():
    budget, note = autoplan.budget_bytes("50%", lambda: (4000, "test device"))
    assert budget == 2000 and "50% of" in note and "test device" in note
    total, where = autoplan_measure.device_total(["/CPU:0", "/CPU:1"])
    assert total > 0 and "RAM divided among 2 logical device(s)" in where


# ----------------------------------------------------------------------------- PipelineModel

def _mlp(seed=0):
    keras.utils.set_random_seed(seed)
    return keras.Sequential([keras.Input((6,)), keras.layers.Dense(16, activation="tanh", name="d1"),
                             keras.layers.Dense(16, activation="relu", name="d2"), keras.layers.Dense(3, name="out")])


def _xy(n=32):
    rng = np.random.default_rng(0)
    return rng.normal(size=(n, 6)).astype("float32"), rng.integers(0, 3, size=n).astype("int32")


def test_auto_pipeline_model_trains_like_the_unsplit_model(capsys):
    reference, twin = _mlp(), _mlp()
    twin.set_weights(reference.get_weights())
    piped = pipeline.PipelineModel(pipeline.split(twin, cuts=["d1"]), devices="cpu", schedule="auto",
                                   microbatches="auto", recompute="auto", memory_budget="1GB")
    config = piped.get_config()
    assert (config["schedule"], config["microbatches"], config["recompute"]) == ("auto", "auto", "auto")
    assert config["memory_budget"] == "1GB"
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    piped.compile(keras.optimizers.SGD(0.1), loss)
    reference.compile(keras.optimizers.SGD(0.1), loss)
    x, y = _xy()
    piped.fit(x, y, batch_size=16, epochs=2, shuffle=False, verbose=0)
    reference.fit(x, y, batch_size=16, epochs=2, shuffle=False, verbose=0)
    for want, got in zip(reference.get_weights(), twin.get_weights()):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    choice = piped.auto_choice
    assert piped.auto_settings is None and piped.microbatches == choice.microbatches
    assert piped.executor.schedule_name == choice.schedule
    assert [s.recompute for s in piped.stages] == [choice.recompute] * 2
    assert choice.microbatches in (1, 2, 4) and choice.best.fits and choice.budget == 10**9
    config = piped.get_config()
    assert (config["schedule"], config["microbatches"]) == (choice.schedule, choice.microbatches)
    assert "memory_budget" not in config
    out = capsys.readouterr().out
    assert "auto plan: " + choice.best.label() in out and "runner-up: " in out
    np.testing.assert_allclose(piped.predict(x, verbose=0), reference.predict(x, verbose=0), rtol=1e-5, atol=1e-6)


def test_refine_keeps_the_fastest_measured_finalist(monkeypatch):
    """The plans predicted within 25% of the best are timed; the fastest measured is chosen, the rest follow."""
    from pipeline.perf import autoplan_refine

    choice = autoplan.choose(_profile(), schedules=TWO)
    finalists = autoplan_refine.finalists(choice, top=3, within=0.25)
    assert 2 <= len(finalists) <= 3 and finalists[0] is choice.best
    assert all(c.step <= choice.best.step * 1.25 for c in finalists)
    assert [c.step for c in finalists] == sorted(c.step for c in finalists)
    near = [c for c in choice.table if c.fits and c.step <= choice.best.step * 1.25]
    ms = {c.microbatches for c in near}
    # the best predicted plan of each M is timed before a second plan of any M
    assert len({c.microbatches for c in finalists}) == min(3, len(ms))
    # the clock disagrees with the simulator: the last finalist is the fastest, the first the slowest
    times = {c.label(): 1.0 + 0.1 * (len(finalists) - i) for i, c in enumerate(finalists)}
    times[finalists[-1].label()] = 0.5
    monkeypatch.setattr(autoplan_refine, "candidate_step", lambda stages, x, c: (lambda: c.label()))
    refined = autoplan_refine.refine(choice, [], None, top=3, within=0.25, timer=lambda run: times[run()])
    assert refined.best.label() == finalists[-1].label() and refined.best.measured == 0.5
    assert refined.runner_up.measured == min(t for label, t in times.items() if label != finalists[-1].label())
    assert len(refined.table) == len(choice.table) and {c.label() for c in refined.table} == {
        c.label() for c in choice.table}
    assert "(measured 0.5000 s)" in refined.summary() and " measured " in autoplan.format_table(refined)
    untimed = autoplan_refine.refine(choice, [], None, top=1)  # one finalist: nothing to time
    assert untimed is choice


def test_auto_measurement_leaves_batchnorm_statistics_and_dropout_seeds_untouched(monkeypatch):
    """Timing runs use training mode; afterwards every variable (BN moving statistics, seed states) is as before."""
    from pipeline.perf import autoplan_measure

    # every plan a finalist: with one plan far ahead of the rest, nothing would be run for real (timing-dependent)
    monkeypatch.setattr(autoplan_measure, "REFINE", {**autoplan_measure.REFINE, "within": 1e9})
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((6,)), keras.layers.Dense(16, name="d1"),
                              keras.layers.BatchNormalization(name="bn"), keras.layers.Dropout(0.3, name="drop"),
                              keras.layers.Dense(3, name="out")])
    piped = pipeline.PipelineModel(pipeline.split(model, cuts=["bn"]), devices="cpu", schedule="auto",
                                   microbatches="auto")
    x = _xy(16)[0] * 5 + 3  # far from BN's initial statistics (mean 0, variance 1)
    piped.build((None, 6))
    before = {v.path: v.numpy().copy() for s in piped.stages for v in s.layer.variables}
    choice = piped.resolve_auto(x)
    assert any(c.measured is not None for c in choice.table)  # finalists were run for real
    after = {v.path: v.numpy() for s in piped.stages for v in s.layer.variables}
    assert before.keys() == after.keys() and any("moving_mean" in p for p in before)
    for path, value in before.items():
        np.testing.assert_array_equal(after[path], value, err_msg=path)


def test_fixed_settings_stay_fixed():
    piped = pipeline.PipelineModel(pipeline.split(_mlp(), cuts=["d1"]), devices="cpu", schedule="gpipe",
                                   microbatches="auto", recompute=True)
    choice = piped.resolve_auto(keras.ops.convert_to_tensor(_xy(8)[0]))
    assert {c.schedule for c in choice.table} == {"gpipe"} and {c.recompute for c in choice.table} == {True}
    assert [s.recompute for s in piped.stages] == [True, True]
    assert piped.resolve_auto(_xy(8)[0]) is choice  # resolved once


def test_a_budget_nothing_fits_is_refused_before_training():
    piped = pipeline.PipelineModel(pipeline.split(_mlp(), cuts=["d1"]), devices="cpu", microbatches="auto",
                                   memory_budget=100)
    piped.compile(keras.optimizers.SGD(0.1), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    weights = [w.copy() for w in piped.get_weights()]
    x, y = _xy(8)
    with pytest.raises(SettingError, match=r"memory_budget: .*smallest need is .* bytes.*Raise memory_budget"):
        piped.fit(x, y, batch_size=8, verbose=0)
    for before, after in zip(weights, piped.get_weights()):
        np.testing.assert_array_equal(before, after)


@pytest.mark.parametrize("kwargs, pattern", [
    ({"microbatches": "many"}, r"microbatches must be an integer >= 1, got 'many'. Or pass 'auto'"),
    ({"recompute": "sometimes", "schedule": "auto"}, r"recompute: got 'sometimes'; give true, false"),
    ({"schedule": "auto", "memory_budget": "much"}, r"memory_budget: got 'much'; give bytes")])
def test_bad_auto_settings_are_refused_at_construction(kwargs, pattern):
    with pytest.raises(SettingError, match=pattern):
        pipeline.PipelineModel(pipeline.split(_mlp(), cuts=["d1"]), devices="cpu", **kwargs)


def test_a_generator_without_a_known_batch_size_asks_for_resolve_auto():
    piped = pipeline.PipelineModel(pipeline.split(_mlp(), cuts=["d1"]), devices="cpu", microbatches="auto")
    piped.compile(keras.optimizers.SGD(0.1), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    x, y = _xy(8)

    def batches():
        while True:
            yield x[:4], y[:4]

    with pytest.raises(SettingError, match=r"resolve_auto"):
        piped.fit(batches(), steps_per_epoch=1, shuffle=False, verbose=0)


# ----------------------------------------------------------------------------- YAML, run folder, CLI

def _cfg(tmp_path, **pipeline_keys):
    raw = {"name": "auto", "model": {"name": "digits_cnn", "args": {"filters": 4, "hidden": 8}},
           "split": {"cuts": ["flatten"]}, "data": {"source": "digits", "batch_size": 8},
           "pipeline": {"devices": "cpu", **pipeline_keys}, "run_dir": str(tmp_path / "run")}
    return config_lib.from_dict(raw)


@pytest.mark.parametrize("keys, pattern", [
    ({"microbatches": "lots"}, r"pipeline.microbatches: got 'lots'"),
    ({"recompute": "maybe"}, r"pipeline.recompute: got 'maybe'"),
    ({"memory_budget": "150%"}, r"pipeline.memory_budget: got '150%'"),
    ({"schedule": "fastest"}, r"pipeline.schedule: got 'fastest'; allowed: .*auto"),
])
def test_yaml_auto_keys_are_validated(tmp_path, keys, pattern):
    with pytest.raises(ConfigError, match=pattern):
        _cfg(tmp_path, **keys)


def test_runner_resolves_records_plan_json_and_reuses_it(tmp_path, capsys):
    cfg = _cfg(tmp_path, schedule="auto", microbatches="auto", recompute="auto", memory_budget="4GB")
    assert (cfg.pipeline.schedule, cfg.pipeline.microbatches) == ("auto", "auto")
    run_dir = cfg.run_dir
    built = runner.build(cfg, run_dir)
    with open(f"{run_dir}/plan.json", encoding="utf-8") as f:
        plan = json.load(f)
    assert (plan["schedule"], plan["microbatches"]) == (built.pipeline.executor.schedule_name,
                                                         built.pipeline.microbatches)
    assert plan["recompute"] == built.pipeline.stages[0].recompute and plan["budget_bytes"] == 4 * 10**9
    assert plan["runner_up"] is not None and len(plan["table"]) >= 2 and plan["settings"]["batch_size"] == 8
    assert "auto plan: " in capsys.readouterr().out
    again = runner.build(cfg, run_dir)  # a resumed run keeps the recorded plan
    assert "auto plan reused from" in capsys.readouterr().out
    assert (again.pipeline.microbatches, again.pipeline.executor.schedule_name) == (plan["microbatches"],
                                                                                    plan["schedule"])


def test_plan_command_prints_the_candidate_table(tmp_path, capsys):
    from pipeline import cli

    path = tmp_path / "auto.yaml"
    path.write_text(json.dumps(_cfg(tmp_path, schedule="auto", microbatches="auto").to_dict()))
    args = cli.build_parser().parse_args(["plan", str(path), "--overhead", "0", "--ms", "1,2", "--repeats", "2",
                                          "--png", str(tmp_path / "g.png")])
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert "<- chosen" in out and "<- runner-up" in out and "auto plan: " in out
    chosen = next(line for line in out.splitlines() if line.endswith("<- chosen")).split()
    assert f"{chosen[0]}, M={chosen[1]}: predicted step" in out  # the plan drawn is the one chosen
