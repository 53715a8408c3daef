"""The package's layers import in one direction only, and importing the package starts nothing heavy."""

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "pipeline"

ORDER = ["core", "perf", "dist", "train", "commands"]
"""A layer may import from itself and the layers before it (and ``pipeline.errors``), never after it."""


def _imports(path: Path) -> set[str]:
    """Every ``pipeline.*`` module a file imports, at top level or inside functions."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "pipeline":
            if node.module == "pipeline":
                found.update(f"pipeline.{alias.name}" for alias in node.names)
            else:
                found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] == "pipeline")
    return found


def _layer_of(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in ORDER else None


@pytest.mark.parametrize("layer", ORDER)
def test_layer_imports_only_layers_before_it(layer):
    allowed = set(ORDER[: ORDER.index(layer) + 1])
    bad = []
    for path in sorted((PACKAGE / layer).glob("*.py")):
        for module in sorted(_imports(path)):
            facade = module == "pipeline" and layer == "commands"  # the demo uses the public API, as users do
            if module == "pipeline.cli" or (not facade and _layer_of(module) not in allowed
                                            and module != "pipeline.errors"):
                bad.append(f"{path.relative_to(PACKAGE.parent)} imports {module}")
    assert not bad, "imports against the layer order " + " -> ".join(ORDER) + ":\n" + "\n".join(bad)


def test_the_layer_check_sees_function_level_imports(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text("def f():\n    from pipeline.train import runner\n    from pipeline import cli\n")
    assert _imports(probe) == {"pipeline.train", "pipeline.cli"}
    assert _layer_of("pipeline.train.runner") == "train"


def test_importing_the_package_starts_no_tensorflow_and_writes_no_environment():
    code = (
        "import os, sys; before = dict(os.environ)\n"
        "import pipeline, pipeline.cli, pipeline.core.schedule, pipeline.perf.simulate, pipeline.perf.planner\n"
        "import pipeline.train.config, pipeline.commands.train, pipeline.commands.plan\n"
        "pipeline.cli.build_parser()\n"
        "assert 'tensorflow' not in sys.modules, 'tensorflow imported'\n"
        "assert 'keras' not in sys.modules, 'keras imported'\n"
        "assert dict(os.environ) == before, set(os.environ.items()) ^ set(before.items())\n"
        "print('ok')\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PIPELINE_CPU_DEVICES"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_public_names_load_lazily():
    import pipeline

    assert set(pipeline.__all__) >= {"PipelineModel", "split", "verify", "Stage", "schedules", "simulate",
                                     "load_config"}
    assert pipeline.split.__module__ == "pipeline.core.partition"
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        pipeline.nope  # noqa: B018
