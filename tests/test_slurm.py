"""``slurm/train.sbatch`` on a real single-node SLURM cluster (../shared/slurm_local.sh), and the launch scripts."""

import os
import re
import subprocess
import sys
import time

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import slurm_lock  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SLURM_LOCAL = os.environ.get("SLURM_LOCAL_SH", os.path.join(os.path.dirname(ROOT), "shared", "slurm_local.sh"))
CONFIG = "configs/digits_cnn.yaml"


def sh(*cmd, check=True, timeout=120, **kw):
    return subprocess.run(list(cmd), capture_output=True, text=True, check=check, timeout=timeout, **kw)


@pytest.fixture(scope="module")
def slurm():
    """A running single-node SLURM: reuse one that is up (others may be using it), else start one.

    Held under :func:`slurm_lock.exclusive`: the stop at the end also stops the munged it started.
    """
    assert os.path.isfile(SLURM_LOCAL), (
        f"{SLURM_LOCAL} not found: the tests need shared/slurm_local.sh beside the clone "
        "(as in CI), or SLURM_LOCAL_SH=/path/to/slurm_local.sh")
    with slurm_lock.exclusive():
        up = False
        try:
            up = sh("sinfo", "-h", "-o", "%T", check=False, timeout=20).stdout.strip() in ("idle", "mixed",
                                                                                           "allocated")
        except (FileNotFoundError, subprocess.TimeoutExpired):
            pass
        started = not up
        if started:
            result = sh("bash", SLURM_LOCAL, "start", check=False, timeout=300)
            assert result.returncode == 0, f"could not start SLURM: {result.stderr[-2000:]}"
        try:
            yield
        finally:
            if started:
                sh("bash", SLURM_LOCAL, "stop", check=False)


def submit(tmp_path, *overrides):
    env = {**os.environ, "PIPELINE_PYTHON": sys.executable, "PIPELINE_CPU_DEVICES": "2",
           "PIPELINE_RUN_DIR": str(tmp_path / "run"), "TF_CPP_MIN_LOG_LEVEL": "2"}
    args = [a for item in ("train.verbose=2", *overrides) for a in ("--set", item)]
    out = sh("sbatch", "--parsable", "-o", str(tmp_path / "job.out"), "slurm/train.sbatch", CONFIG, *args,
             cwd=ROOT, env=env).stdout
    return out.strip().split(";")[0]


def wait(job, timeout=300):
    result = sh("bash", SLURM_LOCAL, "waitjob", job, str(timeout), check=False, timeout=timeout + 30)
    return result.stdout.strip().splitlines()[-1]


def test_sbatch_trains_digits_end_to_end(slurm, tmp_path):
    job = submit(tmp_path, "train.epochs=1", "train.steps_per_epoch=6")
    state = wait(job)
    log = (tmp_path / "job.out").read_text()
    assert state == "COMPLETED", log
    assert f"[train.sbatch] job {job} restart 0" in log
    assert "2 stages on ['/device:CPU:0', '/device:CPU:1']" in log
    assert re.search(r"6/6 - .* - accuracy: [\d.]+ - loss: [\d.]+ - val_accuracy", log), log
    assert "trainer exited with 0" in log
    run = tmp_path / "run"
    for name in ("config.yaml", "metrics.jsonl", "test_metrics.json", "checkpoints/ckpt-6.index"):
        assert (run / name).exists(), name


def test_usr1_checkpoints_and_requeues(slurm, tmp_path):
    job = submit(tmp_path, "train.epochs=4", "train.log_steps=true")
    steps = tmp_path / "run" / "steps.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline:  # signal once it trains, well before it ends
        if steps.exists() and len(steps.read_text().splitlines()) >= 3:
            break
        time.sleep(0.1)
    else:
        pytest.fail(f"job {job} did not start training: {(tmp_path / 'job.out').read_text()}")
    sh("scancel", "--signal=USR1", "--batch", job)
    state = wait(job, timeout=360)
    log = (tmp_path / "job.out").read_text()
    assert state == "COMPLETED", log
    assert "got USR1: forwarding to the trainer" in log
    stopped = re.search(r"preempted at step (\d+): checkpoint written", log)
    assert stopped and "received SIGUSR1" in log and f"requeued SLURM job {job}" in log, log
    step = int(stopped.group(1))
    assert step < 4 * 44
    assert f"[train.sbatch] job {job} restart 1" in log
    assert f"resumed from {tmp_path / 'run'}/checkpoints/ckpt-{step} at step {step}" in log
    assert "Restarts=1" in sh("scontrol", "show", "job", job).stdout
    assert (tmp_path / "run" / "test_metrics.json").exists()


# ------------------------------------------------------------------ launch scripts (no SLURM needed)

def run_script(*args, env=None):
    return subprocess.run(["bash", *args], cwd=ROOT, capture_output=True, text=True, timeout=180,
                          env={**os.environ, **(env or {})})


def test_single_node_usage_and_checks():
    result = run_script("launch/single_node.sh")
    assert result.returncode == 2 and "launch/single_node.sh CONFIG.yaml" in result.stderr
    result = run_script("launch/single_node.sh", "nope.yaml")
    assert result.returncode == 2 and "config file 'nope.yaml' does not exist" in result.stderr


def test_single_node_trains(tmp_path):
    result = run_script("launch/single_node.sh", CONFIG, "--run-dir", str(tmp_path), "--set", "train.epochs=1",
                        "--set", "train.steps_per_epoch=2", "--set", "train.verbose=0",
                        env={"PIPELINE_PYTHON": sys.executable})
    assert result.returncode == 0, result.stderr
    assert "no GPU: CPU fallback" in result.stderr and "test accuracy" in result.stdout
    assert (tmp_path / "test_metrics.json").exists()


def test_replicas_usage_and_checks():
    result = run_script("launch/replicas.sh")
    assert result.returncode == 2 and "launch/replicas.sh N CONFIG.yaml" in result.stderr
    result = run_script("launch/replicas.sh", "two", CONFIG)
    assert result.returncode == 2 and "N must be a whole number >= 1, got 'two'" in result.stderr
    result = run_script("launch/replicas.sh", "2", "nope.yaml")
    assert result.returncode == 2 and "config file 'nope.yaml' does not exist" in result.stderr


def test_replicas_without_horovod_fails_clearly(tmp_path):
    fake = tmp_path / "python"  # a Python where `import horovod` fails, whatever is installed here
    fake.write_text(f"#!/bin/sh\nexec {sys.executable} -c 'import sys; sys.exit(1)'\n")
    fake.chmod(0o755)
    result = run_script("launch/replicas.sh", "2", CONFIG, env={"PIPELINE_PYTHON": str(fake)})
    assert result.returncode == 3
    assert "Horovod is not installed" in result.stderr and "launch/install_horovod.sh" in result.stderr


def test_sbatch_scripts_declare_preemption_and_requeue():
    for name in ("train.sbatch", "replicas.sbatch"):
        text = open(os.path.join(ROOT, "slurm", name), encoding="utf-8").read()
        assert "#SBATCH --signal=B:USR1@120" in text and "#SBATCH --requeue" in text
        assert sh("bash", "-n", os.path.join(ROOT, "slurm", name)).returncode == 0
