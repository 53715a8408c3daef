"""Bench: every section runs on tiny sizes and reports sane, well-formed figures (no timing asserts)."""

import json
import math

import pytest

from pipeline.perf import bench


@pytest.fixture
def in_process(monkeypatch):
    """Runs bench points in this process (threads/devices as the test session set them)."""
    monkeypatch.setattr(bench, "run_point", lambda point, timeout=0: bench.POINTS[point["kind"]](point))


def test_quick_bench_structure(in_process):
    """Every section runs and reports what it claims to (figures that only restate a formula are not checked)."""
    cfg = dict(bench.QUICK, ms=[1, 8], mem_ms=[2, 4], batch=16, steps=1)
    lines = []
    out = bench.run(cfg, log=lines.append)
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
        (s, rc, m) for s in ("gpipe", "1f1b") for rc in (False, True) for m in (2, 4))
    assert all(isinstance(r["tf_peak_mb"], float) and r["tf_peak_mb"] > 0 for r in mem), mem
    assert set(out["memory"]["growth"]) == {"gpipe", "gpipe +recompute", "1f1b", "1f1b +recompute"}
    assert all(math.isfinite(g) for g in out["memory"]["growth"].values())  # NaN where a peak is missing
    # Gradients of the split CNN, each way, against one tape over the unsplit model (in the point's process).
    jac = out["jacobian"]
    assert jac["vjp"]["max_error"] < 1e-5 and jac["jacobian"]["max_error"] < 1e-4
    # 2 + 10 + 1 layers of the uneven model: the equal split cuts after 7; the time split keeps all 13.
    assert out["balance"]["equal"]["stage_layers"] == [7, 6]
    assert sum(out["balance"]["time"]["stage_layers"]) == 13
    assert any(line.startswith("speedup:") for line in lines)


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
