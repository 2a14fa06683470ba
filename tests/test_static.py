"""Lint and strict typing are part of a green build."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

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


#: Top-level directories every Linux machine has: naming one (e.g. /srv/crm/uploads in an
#: example) says nothing about this machine, so only deeper ancestors of the checkout count.
_FHS = {"bin", "boot", "dev", "etc", "home", "lib", "media", "mnt", "opt", "proc", "root", "run", "sbin", "srv",
        "sys", "tmp", "usr", "var"}


def test_no_file_names_a_directory_above_the_checkout() -> None:
    """No committed file names where this checkout lives (the project must run from any clone)."""
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                            capture_output=True, text=True, timeout=60)
    if listed.returncode != 0:
        pytest.skip(f"not a git checkout: {listed.stderr.strip()}")
    above = [p for p in ROOT.parents if len(p.parts) > 2 or (len(p.parts) == 2 and p.parts[1] not in _FHS)]
    pattern = re.compile("|".join(rf"(?<![\w.\-/]){re.escape(str(p))}/" for p in above)) if above else None
    found = []
    for name in listed.stdout.splitlines():
        path = ROOT / name
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue  # binary or gone
        if pattern is not None and (match := pattern.search(text)):
            found.append(f"{name}: {match.group(0)}")
    assert not found, found
