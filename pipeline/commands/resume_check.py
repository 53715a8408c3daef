"""``pipeline resume-check``: SIGKILL a run at a step, resume it, compare losses and weights with an unbroken run."""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from typing import Any, Sequence

from pipeline.errors import SettingError, invalid
from pipeline.train.config import load_config
from pipeline.train.runner import PAUSE_ENV

POLL_SECONDS = 0.005
"""How often the killed run's ``steps.jsonl`` is read while waiting for the kill step."""


def _train(config: str, run_dir: str, overrides: Sequence[str], pause_at: int = 0) -> subprocess.Popen:
    """``python -m pipeline train CONFIG --run-dir RUN --set ...`` in its own process (output to RUN/train.log).

    With ``pause_at``, the run stops itself (SIGSTOP) after logging that step, to be killed there.
    """
    os.makedirs(run_dir, exist_ok=True)
    cmd = [sys.executable, "-m", "pipeline", "train", config, "--run-dir", run_dir]
    for item in overrides:
        cmd += ["--set", item]
    log = open(os.path.join(run_dir, "train.log"), "a", encoding="utf-8")  # noqa: SIM115 - closed by the child
    try:
        env = {**os.environ, "PYTHONUNBUFFERED": "1", PAUSE_ENV: str(pause_at) if pause_at else ""}
        return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    finally:
        log.close()


def _rows(run_dir: str) -> list[tuple[int, float]]:
    """``(step, loss)`` of every complete line of ``steps.jsonl`` (a resumed run repeats the redone steps)."""
    path = os.path.join(run_dir, "steps.jsonl")
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8") as f:
        lines = f.read().split("\n")[:-1]  # the last piece may be a line being written
    return [(int(r["step"]), float(r["loss"])) for r in map(json.loads, lines)]


def _latest(run_dir: str) -> str | None:
    """The newest checkpoint prefix named by ``RUN/checkpoints/checkpoint``, or ``None``."""
    state = os.path.join(run_dir, "checkpoints", "checkpoint")
    if not os.path.exists(state):
        return None
    with open(state, encoding="utf-8") as f:
        m = re.search(r'^model_checkpoint_path: "(.*)"$', f.read(), re.M)
    return os.path.join(run_dir, "checkpoints", m.group(1)) if m else None


def _finish(proc: subprocess.Popen, run_dir: str, what: str, timeout: float) -> str | None:
    """Waits for a run; returns ``None``, or a FAIL line with the end of its log."""
    try:
        code = proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise SettingError(f"--timeout: the {what} run did not finish within {timeout:.0f} s; "
                           "raise --timeout") from None
    if code != 0:
        with open(os.path.join(run_dir, "train.log"), encoding="utf-8") as f:
            tail = "".join(f.readlines()[-15:])
        return f"FAIL: the {what} run exited with code {code}; end of {run_dir}/train.log:\n{tail}"
    return None


def _kill_at(proc: subprocess.Popen, run_dir: str, step: int, timeout: float) -> int:
    """SIGKILLs the run once its ``steps.jsonl`` shows ``step``; returns the last step it logged.

    The run stops itself after logging ``step`` (:data:`~pipeline.train.runner.PAUSE_ENV`), so the kill lands
    at ``step`` however late this process polls (a loaded machine).
    """
    deadline = time.monotonic() + timeout
    while proc.poll() is None and time.monotonic() < deadline:
        rows = _rows(run_dir)
        if rows and rows[-1][0] >= step:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
            return _rows(run_dir)[-1][0]
        time.sleep(POLL_SECONDS)
    if proc.poll() is None:
        proc.kill()
        raise SettingError(f"--timeout: the run did not reach step {step} within {timeout:.0f} s")
    raise SettingError(f"--kill-at: the run ended (exit code {proc.returncode}) before it could be killed at step "
                       f"{step}; see {run_dir}/train.log (a smaller --kill-at, or more --steps)")


def _checkpoint_values(prefix: str) -> dict[str, Any]:
    import tensorflow as tf

    reader = tf.train.load_checkpoint(prefix)
    return {k: reader.get_tensor(k) for k in reader.get_variable_to_shape_map()}


def compare(reference: dict[int, float], rows: list[tuple[int, float]], resumed_from: int, ref_weights: dict,
            weights: dict, steps: int, rtol: float) -> tuple[bool, str]:
    """Compares the killed-and-resumed run's step losses and final checkpoint with the reference.

    Rows logged before the kill are held to bit-identity; rows of the resumed process (after
    ``resumed_from`` rows) and the final weights to ``rtol`` (0: bit-identical).

    Returns:
        ``(passed, one-line verdict)``: PASS with the largest differences, or FAIL naming the first difference.
    """
    import numpy as np

    worst_loss = 0.0
    for i, (step, loss) in enumerate(rows):
        want = reference.get(step)
        tol = 0.0 if i < resumed_from else rtol
        diff = abs(loss - want) if want is not None else float("inf")
        if diff > tol * abs(want if want is not None else 0.0):
            after = "after the resume" if i >= resumed_from else "before the kill"
            return False, (f"FAIL: first differing step {step} ({after}): loss {loss!r}, reference "
                           f"{want!r} (relative difference {diff / max(abs(want or 0.0), 1e-30):.3g})")
        worst_loss = max(worst_loss, diff / max(abs(want), 1e-30))
    missing = sorted(set(range(1, steps + 1)) - {s for s, _ in rows})
    if missing:
        return False, f"FAIL: the resumed run never logged step(s) {missing[:10]}"
    if set(weights) != set(ref_weights):
        odd = sorted(set(weights) ^ set(ref_weights))
        return False, f"FAIL: the final checkpoints hold different variables: {odd[:10]}"
    worst = (0.0, "")
    for key in sorted(ref_weights):
        a, b = np.asarray(weights[key]), np.asarray(ref_weights[key])
        if a.shape != b.shape:
            return False, f"FAIL: final {key} has shape {a.shape}, reference {b.shape}"
        scale = max(float(np.max(np.abs(b.astype(np.float64)))) if b.size else 0.0, 1e-30)
        rel = float(np.max(np.abs(a.astype(np.float64) - b))) / scale if a.size else 0.0
        if rel > rtol or (rtol == 0 and not np.array_equal(a, b)):
            return False, (f"FAIL: final weights differ: {key} (largest difference {rel:.3g} of its largest "
                           f"value; allowed {rtol:g})")
        worst = max(worst, (rel, key))
    kind = "bit-identical" if rtol == 0 else f"within {rtol:g} relative"
    return True, (f"PASS: {len(rows)} logged step losses and {len(ref_weights)} checkpoint tensors {kind} "
                  f"(largest loss difference {worst_loss:.3g} relative; largest weight difference {worst[0]:.3g}"
                  f"{' in ' + worst[1] if worst[1] else ''})")


def resume_check_command(args: argparse.Namespace) -> int:
    """``pipeline resume-check CONFIG --steps N --kill-at S [--epochs E] [--resume-set K=V ...]``."""
    if args.steps < 2:
        raise invalid("--steps", args.steps, "need at least 2 steps (one before the kill, one after)")
    if not 1 <= args.kill_at < args.steps:
        raise invalid("--kill-at", args.kill_at, f"must be between 1 and {args.steps - 1} (--steps - 1)")
    if args.epochs < 1 or args.steps % args.epochs:
        raise invalid("--epochs", args.epochs, f"must be >= 1 and divide --steps ({args.steps})")
    common = [*args.set, f"train.epochs={args.epochs}", f"train.steps_per_epoch={args.steps // args.epochs}",
              "train.log_steps=true", "train.verbose=0", "train.validate=false",
              f"checkpoint.every_steps={args.every}", "checkpoint.enabled=true", "checkpoint.keep=2"]
    load_config(args.config, common)  # a bad config or override fails here, before any run
    load_config(args.config, [*common, *args.resume_set])
    rtol = args.rtol if args.rtol is not None else (1e-5 if args.resume_set else 0.0)
    work = args.work_dir or tempfile.mkdtemp(prefix="pipeline-resume-check-")
    ref_dir, run_dir = os.path.join(work, "reference"), os.path.join(work, "killed")
    for d in (ref_dir, run_dir):
        if os.path.exists(d):
            shutil.rmtree(d)
    print(f"[resume-check] {args.config}: {args.steps} steps ({args.epochs} epoch(s)), SIGKILL at step "
          f"{args.kill_at}, checkpoint every {args.every} step(s); runs in {work}", flush=True)
    started = time.monotonic()
    reference = _train(args.config, ref_dir, common)
    killed = _train(args.config, run_dir, common, pause_at=args.kill_at)
    try:
        last = _kill_at(killed, run_dir, args.kill_at, args.timeout)
    finally:
        if killed.poll() is None:
            killed.kill()
    latest = _latest(run_dir)
    resumed_step = int(latest.rsplit("-", 1)[1]) if latest else 0
    print(f"[resume-check] killed with SIGKILL after step {last}; latest checkpoint: "
          f"{os.path.basename(latest) if latest else 'none'}", flush=True)
    failed = _finish(reference, ref_dir, "reference", args.timeout)
    before = len(_rows(run_dir))
    if not failed:
        failed = _finish(_train(args.config, run_dir, [*common, *args.resume_set]), run_dir, "resumed", args.timeout)
    if failed:
        print(failed + f"\n[resume-check] runs kept in {work}", flush=True)
        return 1
    print(f"[resume-check] resumed at step {resumed_step}"
          f"{' with ' + ' '.join(args.resume_set) if args.resume_set else ''} and trained to step {args.steps} "
          f"({time.monotonic() - started:.0f} s in all)", flush=True)
    ok, verdict = compare(dict(_rows(ref_dir)), _rows(run_dir), before, _checkpoint_values(_latest(ref_dir)),
                          _checkpoint_values(_latest(run_dir)), args.steps, rtol)
    print(verdict, flush=True)
    if ok and not args.keep and not args.work_dir:
        shutil.rmtree(work, ignore_errors=True)
    elif not ok:
        print(f"[resume-check] runs kept in {work} (steps.jsonl, train.log, checkpoints/)", flush=True)
    return 0 if ok else 1


def register(subparsers: Any) -> None:
    """Adds ``resume-check`` to the ``pipeline`` command."""
    text = ("train a config N steps unbroken and, in another folder, SIGKILL it at step S and resume it; "
            "PASS when every step loss and the final weights equal (exit 0), else FAIL with the first "
            "differing step (exit 1)")
    p = subparsers.add_parser("resume-check", help="prove that kill -9 and resume changes nothing", description=text)
    p.add_argument("config", help="YAML run config, e.g. configs/digits_cnn.yaml")
    p.add_argument("--steps", type=int, required=True, metavar="N", help="training steps in all")
    p.add_argument("--kill-at", type=int, required=True, metavar="S", help="SIGKILL the run once it logged step S")
    p.add_argument("--epochs", type=int, default=1, help="split the N steps into this many epochs (default 1)")
    p.add_argument("--every", type=int, default=1, metavar="K", help="checkpoint every K steps (default 1)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override for every run")
    p.add_argument("--resume-set", action="append", default=[], metavar="KEY=VALUE",
                   help="override for the resumed run only, e.g. another topology: --resume-set "
                        "split.cuts=[conv1,conv2,dense1] (then equality is to --rtol, default 1e-5)")
    p.add_argument("--rtol", type=float, default=None,
                   help="relative tolerance (default 0 = bit-identical; 1e-5 with --resume-set)")
    p.add_argument("--work-dir", help="where the two runs go (default: a temporary folder, removed on PASS)")
    p.add_argument("--keep", action="store_true", help="keep the temporary folder after a PASS")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds allowed per run (default 600)")
    p.set_defaults(func=resume_check_command)
