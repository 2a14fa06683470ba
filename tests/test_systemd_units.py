"""The shipped units under a real systemd 252, in a container (tests/systemd/sdharness-proof.sh).

Start, STATUS=, the journal, reload, stop, a watchdog restart, socket activation, the security
score (2.0 or less), and real workers under the sandbox. It needs root and the sdharness tool
beside the repository (../shared/tools/sdharness); where either is missing it is skipped, and
says why.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
HARNESSES = (ROOT.parent / "shared" / "tools" / "sdharness", Path("/work/shared/tools/sdharness"))


@pytest.mark.slow
@pytest.mark.root
@pytest.mark.timeout(1200)
def test_the_units_work_under_a_real_systemd() -> None:
    """sdharness-proof.sh passes: every check of the units under systemd 252, security score <= 2.0."""
    if os.geteuid() != 0:
        pytest.skip("sdharness needs root")
    harness = next((h for h in HARNESSES if h.is_file()), None)
    if harness is None:
        pytest.skip(f"sdharness not found at {' or '.join(map(str, HARNESSES))}")
    result = subprocess.run(["bash", str(ROOT / "tests" / "systemd" / "sdharness-proof.sh")],
                            env={**os.environ, "SDHARNESS": str(harness)}, cwd=ROOT, capture_output=True,
                            text=True, timeout=1150, stdin=subprocess.DEVNULL)
    tail = (result.stdout + result.stderr)[-6000:]
    assert result.returncode == 0, tail
    assert "\nPASS" in result.stdout, tail
    assert " 0 failed" in result.stdout, tail
