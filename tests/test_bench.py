"""Bench: every section runs on tiny sizes and reports sane, well-formed figures (no timing asserts)."""

import json
import math

import pytest

from pipeline.perf import bench


@pytest.fixture
def in_process(monkeypatch):
    """Runs bench points in this process (threads/devices as the test session set them)."""
    monkeypatch.setattr(bench, "run_point", lambda point, timeout=0, module=None: bench.POINTS[point["kind"]](point))


def test_quick_bench_structure(in_process):
    """Every section runs and reports what it claims to (figures that only restate a formula are not checked)."""
    cfg = dict(bench.QUICK, ms=[1, 8], mem_ms=[2, 4], batch=16, steps=1)
    lines = []
    # The schedules, build, overlap and auto sections have their own tests below.
    out = bench.run(cfg, log=lines.append,
                    sections=tuple(s for s in bench.SECTIONS if s not in ("schedules", "build", "overlap", "auto")))
    json.dumps(out)  # serializable
    assert set(out["overhead"]) == {"keras", "pipeline", "ratio"}
    rows = out["speedup"]["rows"]
    assert [r["m"] for r in rows] == [1, 8]
    assert "costs" not in rows[0]  # the simulator's figures come from the M=8 point only
    assert len(rows[1]["costs"]) == len(rows[1]["costs_alone"]) == 2  # K=2: one (F, B) pair per stage
    assert out["simulator"]["m"] == 8
    # Memory: every point has a TF step peak. Only TF's BFC CPU allocator keeps statistics, and TF picks it by
    # itself on some processors only: without TF_CPU_ALLOCATOR_USE_BFC=true (conftest) this was None on AMD.
    mem = out["memory"]["rows"]
    assert sorted((r["schedule"], r["recompute"], r["m"]) for r in mem) == sorted(
        [(s, rc, m) for s in ("gpipe", "1f1b") for rc in (False, True) for m in (2, 4)]
        + [("zb_h1", False, m) for m in (2, 4)])  # interleaved_1f1b skipped: K=2 stages on 2 devices is 1f1b
    assert "  interleaved_1f1b: skipped, K=2 stages on 2 devices run it as 1f1b" in " ".join(lines)
    assert all(isinstance(r["tf_peak_mb"], float) and r["tf_peak_mb"] > 0 for r in mem), mem
    assert all(r["predicted_peak_mb"] > 0 for r in mem), mem  # the planner's estimate beside each measured peak
    assert any("(planner's estimate" in line for line in lines), lines
    assert set(out["memory"]["growth"]) == {"gpipe", "gpipe +recompute", "1f1b", "1f1b +recompute", "zb_h1"}
    assert all(math.isfinite(g) for g in out["memory"]["growth"].values())  # NaN where a peak is missing
    # Gradients of the split CNN, each way, against one tape over the unsplit model (in the point's process).
    jac = out["jacobian"]
    assert jac["vjp"]["max_error"] < 1e-5 and jac["jacobian"]["max_error"] < 1e-4
    # 2 + 10 + 1 layers of the uneven model: the equal split cuts after 7; the time split keeps all 13.
    assert out["balance"]["equal"]["stage_layers"] == [7, 6]
    assert sum(out["balance"]["time"]["stage_layers"]) == 13
    assert any(line.startswith("speedup:") for line in lines)


def test_auto_section_quick(in_process):
    """digits_cnn resolved as `pipeline train` does (finalists timed), then candidates timed one by one."""
    from pipeline.commands import bench_auto  # noqa: F401 - registers the section

    cfg, out, lines = _quick_section("auto")
    auto = out["auto"]["digits_cnn"]
    assert sum(c["measured"] is not None for c in auto["resolved"]["table"]) == cfg["auto_refine"]["top"]
    assert auto["choice"] in auto["measured"] and len(auto["measured"]) >= cfg["auto_reduced"]["digits_cnn"]
    best = min(auto["measured"].values())
    assert auto["ratio"] == pytest.approx(auto["measured"][auto["choice"]] / best)
    assert any("(target <= 1.05)" in line for line in lines), lines


def test_gpipe_keeps_every_microbatch_alive():
    """Peak memory of a step (each point in a fresh process, as the bench runs it): GPipe runs all M forwards
    before the first backward, so 6 more micro-batches hold at least 6 x the activations one needs for its
    backward. Not a timing: TF's allocator counts bytes."""
    micro, width = 64, 256
    peaks = {}
    for m in (2, 8):
        r = bench.run_point({"kind": "step", "mode": "pipeline", "k": 2, "m": m, "schedule": "gpipe",
                             "recompute": False, "width": width, "layers": 4, "batch": micro * m, "in_dim": 8,
                             "out_dim": 8, "steps": 1, "threads": [1, 2]})
        assert isinstance(r["tf_peak_mb"], float), r  # the worker starts TF with the BFC allocator
        peaks[m] = r["tf_peak_mb"]
    # Kept for the weight gradients: each of the 8 Dense(256) layers' input, 64 x 256 float32 = 64 KiB,
    # i.e. 0.5 MiB per micro-batch (measured: +3.1 MiB for 6 more micro-batches; 1F1B, 2 in flight: +0.7 MiB).
    one_microbatch_mb = 8 * micro * width * 4 / 2**20
    assert peaks[8] - peaks[2] >= 0.5 * 6 * one_microbatch_mb, peaks


def test_worker_protocol_in_a_fresh_process():
    result = bench.run_point({"kind": "jacobian", "method": "vjp", "cnn_batch": 2, "threads": [1, 1],
                              "devices": 1})
    assert result["max_error"] < 1e-5 and result["rss_mb"] > 0


def test_failed_point_reports_output():
    with pytest.raises(RuntimeError, match="bench point .* failed"):
        bench.run_point({"kind": "nope"})


def test_unknown_section(capsys):
    from pipeline import cli

    assert cli.main(["bench", "--sections", "speed"]) == 2
    assert "unknown section(s) ['speed']" in capsys.readouterr().err


def test_build_section_quick(in_process):
    """Per build mode: first fit, peak RSS, steady step and traced ops per M, and the ratio lines the issue asks for."""
    lines = []
    out = bench.run(dict(bench.QUICK), log=lines.append, sections=("build",))
    json.dumps(out)
    modes = out["build"]["modes"]
    assert list(modes) == bench.QUICK["build_modes"] == ["1f1b", "looped"]
    for mode, res in modes.items():
        assert [r["m"] for r in res["rows"]] == bench.QUICK["build_ms"]
        for r in res["rows"]:
            assert r["first"] > 0 and r["rss_mb"] > 0 and r["step"] > 0, r
            assert r["ops"] > 0, r  # the step's graph was seen
    assert all(r["actions"] >= 2 * out["build"]["k"] for r in modes["1f1b"]["rows"])  # unrolled: the actions
    assert modes["looped"]["rows"][-1]["actions"] == 0  # M=6 = K + 4: tick loops, no unrolled actions
    lo, hi = bench.QUICK["build_ms"]
    assert any(line.startswith(f"    first-step ratio M={hi} / M={lo}:") for line in lines), lines
    assert any(line.startswith(f"    peak RSS growth M={lo} -> M={hi}:") for line in lines), lines
    assert any(line.startswith(f"    steady step M={hi} / M={lo}") for line in lines), lines
    steady = out["build"]["loop_steady"]  # looped vs unrolled GPipe + recompute, alternated in one process
    assert [(r["width"], r["batch"], r["m"]) for r in steady] == list(bench.QUICK["loop_steady"])
    for r in steady:
        assert r["looped"] > 0 and r["unrolled"] > 0 and r["ratio"] == pytest.approx(r["looped"] / r["unrolled"])
    assert any("alternated in one process" in line for line in lines), lines


def _quick_section(section):
    """Runs one section at the QUICK sizes: (sizes, JSON-serializable results, logged lines)."""
    lines = []
    cfg = dict(bench.QUICK)
    out = bench.run(cfg, log=lines.append, sections=(section,))
    json.dumps(out)
    return cfg, out, lines


def test_overlap_section_quick(in_process):
    """The sweep reports % of ideal per point, and the worst point's profile attributes ops to both stages."""
    cfg, out, lines = _quick_section("overlap")
    rows = out["overlap"]["rows"]
    assert sorted((r["width"], r["rows"]) for r in rows) == sorted(
        (w, r) for w in cfg["overlap_widths"] for r in cfg["overlap_rows"])
    assert all(r["of_ideal"] > 0 and r["ideal"] == pytest.approx(4 / 3) for r in rows)  # K=2, M=2
    prof = out["overlap"]["profile"]["pipeline"]
    for stage in ("0", "1"):  # ops of each stage's layers found, forward and backward
        assert prof["categories"]["forward"].get(stage, 0) > 0 and prof["categories"]["backward"].get(stage, 0) > 0
    assert sum(prof["categories"]["copy"].values()) > 0  # the cut activation and its gradient cross devices
    unsplit = out["overlap"]["profile"]["unsplit"]
    assert unsplit["categories"]["forward"].get("1", 0) > 0  # the unsplit model's second half, same names
    assert sum(" of ideal " in line and "(runs: " in line for line in lines) == len(rows)  # one line per point
    assert any(line.startswith("  | accumulate |") for line in lines), lines


def test_schedules_section_quick(in_process):
    """ZB-H1 and interleaved 1F1B run against 1F1B at each M; the costs hold the measured weight-gradient part."""
    cfg, out, lines = _quick_section("schedules")
    rows = out["schedules"]["rows"]
    assert sorted((r["schedule"], r["stages"], r["m"]) for r in rows) == sorted(
        (s, k, m) for s, k in (("1f1b", 2), ("zb_h1", 2), ("interleaved_1f1b", 4)) for m in cfg["sched_ms"])
    for r in rows:
        assert r["step"] > 0 and r["predicted"] > 0
        assert len(r["steps"]) == cfg["sched_rounds"] and r["step"] == min(r["steps"])  # alternated, fastest kept
        assert (r["two_walks"] > 0) if r["schedule"] == "zb_h1" else r["two_walks"] is None
        assert len(r["costs"]) == len(r["costs_alone"]) == r["stages"] and r["predicted_shared"] > 0
        for f, b, w in r["costs"]:
            assert f > 0 and b >= 0
            # W measured for ZB-H1's split backward (part of it), not assumed; other schedules run no W
            assert (0 <= w <= b) if r["schedule"] == "zb_h1" else w is None
    assert any(line.startswith("  zb_h1 / 1f1b at M=") and "target <=" in line for line in lines), lines
    assert any(line.startswith("  interleaved_1f1b / 1f1b at M=") for line in lines), lines


def test_micro_batched_baseline_is_the_batch_step():
    """The overlap baseline (M micro-batches one after the other, one apply) trains like one whole-batch step."""
    import keras
    import numpy as np

    from pipeline.perf import bench_overlap

    rng = np.random.default_rng(0)
    x = rng.normal(size=(8, 6)).astype("float32")
    y = rng.normal(size=(8, 3)).astype("float32")

    def body():
        keras.utils.set_random_seed(1)
        return keras.Sequential([keras.Input((6,)), keras.layers.Dense(5, activation="tanh"), keras.layers.Dense(3)])

    plain = body()
    plain.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
    plain.fit(x, y, batch_size=8, epochs=2, verbose=0, shuffle=False)
    micro = bench_overlap.micro_batched(body(), 4)
    micro.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
    micro.fit(x, y, batch_size=8, epochs=2, verbose=0, shuffle=False)
    for a, b in zip(plain.get_weights(), micro.body.get_weights()):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    assert not np.allclose(plain.get_weights()[0], body().get_weights()[0])  # the step changed the weights


def test_op_categories_of_real_op_names():
    """Names as they appear in a profiled K=2 fit step (functions called by the executor lose the act scope)."""
    from pipeline.perf import bench_overlap
    from pipeline.perf.trace import op_category

    pattern = bench_overlap.STAGE_OF_LAYER
    cases = {("StatefulPartitionedCall/act1B3/add_2", "AddV2"): ("accumulate", 1),
             ("gradients/sequential_1/s1_d0_1/MatMul_grad/MatMul", "MatMul"): ("backward", 1),
             ("sequential/s0_d2_1/Relu", "_FusedMatMul"): ("forward", 0),
             ("StatefulPartitionedCall/sgd/AssignSubVariableOp_3", "AssignSubVariableOp"): ("optimizer", None),
             ("StatefulPartitionedCall/act0F1/StatefulPartitionedCall/_12", "_Send"): ("copy", 0),
             ("StatefulPartitionedCall/act1F0/compile_loss/mse/Mean", "Mean"): ("loss", 1),
             ("StatefulPartitionedCall/split", "SplitV"): ("other", None),
             ("add_3", "AddV2"): ("accumulate", None),  # a traced gradient-sum function's ops lose the scope
             ("StatefulPartitionedCall/Add_1", "AddV2"): ("other", None)}  # Keras' iteration counter
    for (name, op_type), expected in cases.items():
        assert op_category(name, op_type, pattern) == expected, (name, op_type)


def test_bench_flags_are_checked(capsys):
    from pipeline import cli

    assert cli.main(["bench", "--sections", "build", "--build-k", "0"]) == 2
    assert "--build-k: got 0" in capsys.readouterr().err
    assert cli.main(["bench", "--sections", "overlap", "--resnet"]) == 2
    assert "add build to --sections" in capsys.readouterr().err
