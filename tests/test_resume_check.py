"""``pipeline resume-check`` on the digits config: PASS when resume is exact, FAIL naming the step for a planted bug."""

import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Put on PYTHONPATH of the runs: a data-order bug (a resumed run skips one batch too few), planted from outside
# the production code by wrapping pipeline.train.data.train_stream when that module is imported.
PLANTED_BUG = '''
import importlib.abc, importlib.util, sys

class _PlantBug(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != "pipeline.train.data":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        exec_module = spec.loader.exec_module

        def exec_with_bug(module):
            exec_module(module)
            original = module.train_stream

            def train_stream(train, batch_size, steps, seed, start_step=0, **kwargs):
                return original(train, batch_size, steps, seed, max(start_step - 1, 0), **kwargs)

            module.train_stream = train_stream

        spec.loader.exec_module = exec_with_bug
        return spec

sys.meta_path.insert(0, _PlantBug())
'''


def resume_check(tmp_path, *extra, pythonpath=None):
    cmd = [sys.executable, "-m", "pipeline", "resume-check", "configs/digits_cnn.yaml", "--steps", "8", "--kill-at",
           "5", "--epochs", "2", "--set", "model.args={filters: 4, hidden: 16}", "--work-dir", str(tmp_path / "w"),
           *extra]
    env = {**os.environ, "PIPELINE_CPU_DEVICES": "4", "TF_CPP_MIN_LOG_LEVEL": "2"}
    if pythonpath:
        env["PYTHONPATH"] = os.pathsep.join([pythonpath, *filter(None, [env.get("PYTHONPATH")])])
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)


def checkpoint_at_kill(out):
    m = re.search(r"killed with SIGKILL after step (\d+); latest checkpoint: ckpt-(\d+)", out)
    assert m, out
    killed, saved = int(m.group(1)), int(m.group(2))
    # The run stops itself after logging step 5, so the kill lands there however late the parent polls.
    assert killed == 5 and killed - 1 <= saved <= killed, out  # a checkpoint every step
    return saved


def test_resume_check_on_digits_passes_bit_identical(tmp_path):
    run = resume_check(tmp_path)
    assert run.returncode == 0, run.stdout + run.stderr[-3000:]
    saved = checkpoint_at_kill(run.stdout)
    assert f"resumed at step {saved} and trained to step 8" in run.stdout
    assert re.search(r"^PASS: \d+ logged step losses and 33 checkpoint tensors bit-identical \(largest loss "
                     r"difference 0 relative; largest weight difference 0", run.stdout, re.M), run.stdout


def test_planted_data_order_bug_fails_at_the_first_resumed_step(tmp_path):
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(PLANTED_BUG)
    run = resume_check(tmp_path, pythonpath=str(site))
    assert run.returncode == 1, run.stdout + run.stderr[-3000:]
    saved = checkpoint_at_kill(run.stdout)
    assert f"FAIL: first differing step {saved + 1} (after the resume): loss " in run.stdout, run.stdout
    assert "runs kept in" in run.stdout


def test_compare_holds_steps_before_the_kill_bit_exact_and_the_resumed_ones_to_rtol():
    import numpy as np

    from pipeline.commands.resume_check import compare

    ref = {1: 2.0, 2: 1.5, 3: 1.25}
    w = {"model/d/kernel": np.array([1.0, -2.0], np.float32), "meta/step": np.int64(3)}
    near = {**w, "model/d/kernel": np.array([1.0, -2.0 + 1e-5], np.float32)}
    rows = [(1, 2.0), (2, 1.5), (2, 1.5 * (1 + 4e-6)), (3, 1.25)]  # step 2 redone after the resume
    ok, verdict = compare(ref, rows, 2, w, near, 3, 1e-5)
    assert ok and verdict.startswith("PASS: 4 logged step losses and 2 checkpoint tensors within 1e-05 relative")
    ok, verdict = compare(ref, rows, 2, w, near, 3, 0.0)
    assert not ok and verdict.startswith("FAIL: first differing step 2 (after the resume): loss 1.500006")
    ok, verdict = compare(ref, [(1, 2.0), (2, 1.5 * (1 + 4e-6)), (3, 1.25)], 3, w, w, 3, 1e-5)
    assert not ok and verdict.startswith("FAIL: first differing step 2 (before the kill)")
    ok, verdict = compare(ref, rows, 2, w, {**w, "model/d/kernel": np.array([1.0, -1.9], np.float32)}, 3, 1e-5)
    assert not ok and verdict.startswith("FAIL: final weights differ: model/d/kernel (largest difference 0.05")
    ok, verdict = compare(ref, rows[:2], 2, w, w, 3, 0.0)
    assert not ok and verdict == "FAIL: the resumed run never logged step(s) [3]"


def test_the_killed_run_stops_itself_after_logging_the_kill_step(tmp_path, monkeypatch):
    """resume-check's SIGKILL lands at --kill-at however late it polls: the run SIGSTOPs itself right after
    logging that step (and only then; a run without the setting never stops)."""
    import signal

    from pipeline.train import runner

    sent = []
    monkeypatch.setattr(runner.os, "kill", lambda pid, sig: sent.append((pid, sig)))
    path = tmp_path / "steps.jsonl"
    for pause, want in (("6", [(os.getpid(), signal.SIGSTOP)]), ("", [])):
        sent.clear()
        monkeypatch.setenv(runner.PAUSE_ENV, pause)
        steps = runner._steps_callback(str(path), 3)  # resumed at step 3
        stopped_after = []
        for batch in range(5):
            steps.on_train_batch_end(batch, {"batch_loss": 0.5})
            if sent and not stopped_after:  # the line of the step is written before the stop
                stopped_after = [steps.step, path.read_text().splitlines()[-1]]
        assert sent == want
        assert stopped_after == ([6, '{"step": 6, "loss": 0.5}'] if want else [])
