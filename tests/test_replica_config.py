"""``pipeline.replicas: R`` in a run config: validated, and checked against the processes the launcher started."""

import os

import pytest

from pipeline.train import runner
from pipeline.train.config import ConfigError, load_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "configs", "digits_cnn.yaml")


def test_replicas_must_be_a_count():
    assert load_config(CONFIG).pipeline.replicas is None
    assert load_config(CONFIG, ["pipeline.replicas=1"]).pipeline.replicas == 1
    with pytest.raises(ConfigError, match=r"pipeline.replicas: got 0; must be >= 1"):
        load_config(CONFIG, ["pipeline.replicas=0"])


def test_a_replica_count_the_launcher_did_not_start_is_refused_before_any_work(tmp_path):
    cfg = load_config(CONFIG, ["pipeline.replicas=2"])
    run_dir = tmp_path / "run"
    with pytest.raises(ConfigError, match=r"pipeline.replicas: got 2; but 1 replica process\(es\) were started "
                                          r"\(backend none\); start 2 \(`horovodrun -np 2"):
        runner.train(cfg, str(run_dir))
    assert not run_dir.exists(), "nothing may be written before the check"
