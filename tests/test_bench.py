"""Bench: every section runs on tiny sizes and reports sane, well-formed figures (no timing asserts)."""

import json

import pytest

from pipeline.perf import bench


@pytest.fixture
def in_process(monkeypatch):
    """Runs bench points in this process (threads/devices as the test session set them)."""
    monkeypatch.setattr(bench, "run_point", lambda point, timeout=0: bench.POINTS[point["kind"]](point))


def test_quick_bench_structure(in_process):
    cfg = dict(bench.QUICK, ms=[1, 8], mem_ms=[2, 4], batch=16, steps=1)
    lines = []
    out = bench.run(cfg, log=lines.append)
    json.dumps(out)  # serializable
    assert out["overhead"]["ratio"] > 0
    rows = out["speedup"]["rows"]
    assert [r["m"] for r in rows] == [1, 8]
    for r in rows:
        assert r["step"] > 0 and r["speedup"] > 0 and r["efficiency"] > 0
        assert r["ideal"] == pytest.approx(2 * r["m"] / (r["m"] + 1))
    assert out["simulator"]["m"] == 8 and out["simulator"]["predicted"] > 0
    assert len(rows[1]["costs"]) == 2
    assert out["machine"]["contention"] >= 1 and 0 < out["machine"]["parallel_speedup"] <= 2
    assert 0 <= out["machine"]["profile_m8"]["overlap_fraction"] <= 1
    assert out["machine"]["efficiency_m8"] > 0
    sim_out = out["simulator"]
    assert sim_out["predicted"] == pytest.approx(sim_out["makespan"] + sim_out["overhead"])
    assert sim_out["ratio"] == pytest.approx(sim_out["predicted"] / sim_out["measured"])
    assert len(rows[1]["costs_alone"]) == 2
    mem = out["memory"]["rows"]
    assert {(r["schedule"], r["recompute"]) for r in mem} == {
        ("gpipe", False), ("gpipe", True), ("1f1b", False), ("1f1b", True)}
    assert all(r["rss_mb"] > 0 and r["tf_peak_mb"] >= 0 for r in mem)
    assert set(out["memory"]["rss_growth"]) == set(out["memory"]["growth"])
    assert set(out["memory"]["growth"]) == {"gpipe", "gpipe +recompute", "1f1b", "1f1b +recompute"}
    jac = out["jacobian"]
    assert jac["tape"]["max_error"] == 0
    assert jac["vjp"]["max_error"] < 1e-5 and jac["jacobian"]["max_error"] < 1e-4
    assert jac["time_ratio"] > 0
    assert out["balance"]["predicted_speedup"] > 0
    assert sum(out["balance"]["equal"]["stage_layers"]) == sum(out["balance"]["time"]["stage_layers"]) == 13
    assert any(line.startswith("speedup:") for line in lines)


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
