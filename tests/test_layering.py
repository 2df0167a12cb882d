"""The architecture holds: the import contract (pyproject.toml: layers, and no import cycles) is kept, and every
module imports, whatever was imported before it."""

from __future__ import annotations

import random
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
MODULES = sorted(
    ".".join(p.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__")
    for p in (REPO / "infinitune").rglob("*.py")
)


def test_the_import_contract_is_kept():
    lint = Path(sys.executable).with_name("lint-imports")
    done = subprocess.run([str(lint)], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert "2 kept, 0 broken" in done.stdout


def test_the_contract_catches_a_cycle(tmp_path):
    """A copy of the package where the loading module imports evaluation back: the contract breaks."""
    import shutil

    shutil.copytree(REPO / "infinitune", tmp_path / "infinitune")
    shutil.copy(REPO / "pyproject.toml", tmp_path / "pyproject.toml")
    with open(tmp_path / "infinitune" / "trainer" / "loading.py", "a") as f:
        f.write("\n\ndef _back():\n    from infinitune.trainer.evaluate import load_examples  # noqa: F401\n")
    lint = Path(sys.executable).with_name("lint-imports")
    env = {"PYTHONPATH": str(tmp_path), "PATH": "/usr/bin:/bin"}
    done = subprocess.run([str(lint), "--no-cache"], cwd=tmp_path, capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode != 0
    assert ".loading -> .evaluate" in done.stdout


@pytest.mark.slow
@pytest.mark.parametrize("order", ["sorted", "reversed", "shuffled"])
def test_every_module_imports_in_any_order(order):
    modules = {"sorted": MODULES, "reversed": MODULES[::-1]}.get(order) or random.Random(0).sample(
        MODULES, len(MODULES)
    )
    code = "import importlib, sys\nfor m in sys.argv[1:]:\n    importlib.import_module(m)\n"
    done = subprocess.run([sys.executable, "-c", code, *modules], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]


def test_the_cli_and_the_job_config_do_not_import_torch_or_ray():
    """`infinitune --help`, `config` and `plan` stay fast: torch, Ray and transformers are imported by the commands
    that need them."""
    code = (
        "import sys, infinitune.launcher.cli, infinitune.launcher.job_config\n"
        "print(sorted(m for m in ('torch', 'ray', 'transformers', 'deepspeed') if m in sys.modules))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "[]"
