"""Lint and strict typing are part of a green build."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def test_ruff_finds_nothing() -> None:
    """ruff (rules in pyproject.toml) passes on the package, the tests and the benchmarks."""
    result = subprocess.run([str(BIN / "ruff"), "check", "whatsappd", "tests", "bench"], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


def test_mypy_strict_passes_on_the_package() -> None:
    """mypy --strict (settings in pyproject.toml) finds no type error in whatsappd/."""
    result = subprocess.run([str(BIN / "mypy"), "whatsappd"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
