"""``pipeline train | evaluate | predict``: run a YAML config into a run folder, or use a trained one."""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys
from typing import Any

from pipeline.errors import PipelineError
from pipeline.train.config import load_config


def _available_configs() -> str:
    found = sorted(glob.glob(os.path.join("configs", "*.yaml")))
    return ", ".join(found) if found else "(none in ./configs)"


def _restored(args: argparse.Namespace) -> tuple[Any, Any]:
    from pipeline.train import runner

    cfg = load_config(args.config, args.set)
    return cfg, runner.restore(cfg, runner.run_dir_for(cfg, args.run_dir), args.checkpoint)


def _needs_config(func: Any) -> Any:
    """Refuses a command without a config file, naming the configs that exist."""

    def run(args: argparse.Namespace) -> int:
        if not args.config:
            raise PipelineError(f"needs a config file, e.g. `pipeline {args.command} configs/digits_cnn.yaml`. "
                                f"Available: {_available_configs()}")
        return func(args)

    return run


def train_command(args: argparse.Namespace) -> int:
    """``pipeline train CONFIG [--set k=v ...] [--run-dir DIR]``."""
    from pipeline.dist import replicas
    from pipeline.train import runner

    cfg = load_config(args.config, args.set)
    replicas.init()  # Horovod under horovodrun/mpirun (or PIPELINE_REPLICAS=horovod), else one replica
    return runner.train(cfg, runner.run_dir_for(cfg, args.run_dir), shard=(replicas.size(), replicas.rank()),
                        reducer=replicas.reducer())


def evaluate_command(args: argparse.Namespace) -> int:
    """``pipeline evaluate CONFIG [--checkpoint PATH]``: test-set metrics as JSON on stdout."""
    from pipeline.train import data as data_lib

    cfg, b = _restored(args)
    results = b.pipeline.evaluate(data_lib.eval_dataset(b.data.test, cfg.data.batch_size), verbose=0,
                                  return_dict=True)
    print(json.dumps({k: float(v) for k, v in results.items() if k != "batch_loss"}))
    return 0


def predict_command(args: argparse.Namespace) -> int:
    """``pipeline predict CONFIG [--checkpoint PATH] [--limit N] [--output FILE]``: test-set predictions as JSONL."""
    import numpy as np

    from pipeline.train import data as data_lib

    cfg, b = _restored(args)
    test = b.data.test.take(args.limit) if args.limit else b.data.test
    labels = np.concatenate([y.numpy().reshape(-1) for _, y in test.batch(cfg.data.batch_size)])
    probs = b.pipeline.predict(data_lib.eval_dataset(test.map(lambda x, y: x), cfg.data.batch_size), verbose=0)
    names = b.data.class_names or [str(i) for i in range(b.data.num_classes)]
    out = open(args.output, "w", encoding="utf-8") if args.output else sys.stdout
    try:
        for i, (label, p) in enumerate(zip(labels, probs)):
            k = int(np.argmax(p))
            out.write(json.dumps({"index": i, "label": names[int(label)], "predicted": names[k],
                                  "probability": float(p[k])}) + "\n")
    finally:
        if out is not sys.stdout:
            out.close()
    print(f"[pipeline] {len(labels)} predictions, accuracy {float(np.mean(np.argmax(probs, 1) == labels)):.4f}",
          file=sys.stderr, flush=True)
    return 0


def register(subparsers: Any) -> None:
    """Adds ``train``, ``evaluate`` and ``predict`` to the ``pipeline`` command."""
    specs = {
        "train": (train_command, "train a YAML config; rerun the same command to resume"),
        "evaluate": (evaluate_command, "test-set metrics of a trained run"),
        "predict": (predict_command, "test-set predictions of a trained run (JSON lines)"),
    }
    for name, (func, help_text) in specs.items():
        p = subparsers.add_parser(name, help=help_text, description=help_text)
        p.add_argument("config", nargs="?", help="YAML run config, e.g. configs/digits_cnn.yaml")
        p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="override a config value, e.g. --set train.epochs=3 (repeatable)")
        p.add_argument("--run-dir", help="run folder (default: the config's run_dir, else runs/<name>)")
        if name != "train":
            p.add_argument("--checkpoint", help="run folder, checkpoints folder or checkpoint prefix "
                                                "(default: the run folder's latest)")
        if name == "predict":
            p.add_argument("--limit", type=int, default=0, help="predict only the first N test examples")
            p.add_argument("--output", help="write JSON lines here instead of stdout")
        p.set_defaults(func=_needs_config(func))
