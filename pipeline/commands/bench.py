"""``pipeline bench``: run the benchmark sections and write their figures (ratios against same-run baselines)."""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

from pipeline.errors import SettingError
from pipeline.perf import bench
from pipeline.commands import bench_auto  # noqa: F401 - registers the "auto" section with pipeline.perf.bench


def bench_command(args: argparse.Namespace) -> int:
    """``pipeline bench [--quick] [--sections a,b] [--build-k K] [--resnet] [--json PATH]``."""
    cfg = dict(bench.QUICK if args.quick else bench.FULL)
    started = time.time()
    sections = tuple(args.sections.split(",")) if args.sections else bench.SECTIONS
    unknown = [s for s in sections if s not in bench.SECTIONS]
    if unknown:
        raise SettingError(f"--sections: unknown section(s) {unknown}; choose from {', '.join(bench.SECTIONS)}")
    if args.build_k is not None:
        if args.build_k < 1:
            raise SettingError(f"--build-k: got {args.build_k}; the build section needs at least 1 stage "
                               "(one logical CPU device per stage), e.g. --build-k 4")
        cfg["build_k"] = args.build_k
    if args.resnet:
        if "build" not in sections:
            raise SettingError(f"--resnet adds ResNet50 to the 'build' section, which --sections {args.sections} "
                               "leaves out; add build to --sections")
        cfg["resnet"] = True
    results = bench.run(cfg, sections=sections)
    results["seconds"] = time.time() - started
    with open(args.json, "w", encoding="utf-8") as f:
        json.dump(results, f, indent=2)
    print(f"results: {args.json} ({results['seconds']:.0f} s)")
    return 0


def register(subparsers: Any) -> None:
    """Adds ``bench`` to the ``pipeline`` command."""
    help_text = ("measure overhead, speedup, memory, Jacobian vs VJP, simulator accuracy, balancing, build cost "
                 "and overlap on small micro-batches")
    p = subparsers.add_parser("bench", help=help_text, description=help_text)
    p.add_argument("--quick", action="store_true", help="tiny sizes: checks that every section runs")
    p.add_argument("--sections", help=f"comma-separated subset of {','.join(bench.SECTIONS)} (default: all)")
    p.add_argument("--build-k", type=int, help="build section: stages (logical CPU devices), default 2")
    p.add_argument("--resnet", action="store_true",
                   help="build section: also ResNet50 split in K=4 at M=1 and M=16 (minutes)")
    p.add_argument("--json", default="bench.json", help="where to write the results (default: bench.json)")
    p.set_defaults(func=bench_command)

