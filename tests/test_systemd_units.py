"""The shipped units under a real systemd 252, in a container (tests/systemd/sdharness-proof.sh).

Start, STATUS=, the journal, reload, stop, a watchdog restart, socket activation, exit 78 and 65
without a restart loop, the security score (2.0 or less), real workers under the sandbox, and the
zygote under it (a forked worker's parent is MainPID; kill -9 of the zygote spares the workers).
It needs root and the sdharness tool: $WHATSAPPD_SDHARNESS, else shared/tools/sdharness beside
the repository (../shared/tools/sdharness from its root); where either is missing it is
skipped, and says why. The Debian rootfs it builds (about 520 MB; a run takes about 4 minutes
on 2 cores) is removed at the end unless $WHATSAPPD_PROOF_CACHE names a directory to keep it in.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRATCH = Path("/var/tmp")


def harness() -> tuple[Path, str]:
    """Where the harness should be, and how that was decided (for the skip message)."""
    if os.environ.get("WHATSAPPD_SDHARNESS"):
        return Path(os.environ["WHATSAPPD_SDHARNESS"]), "from $WHATSAPPD_SDHARNESS"
    return ROOT.parent / "shared" / "tools" / "sdharness", "beside the repository; set $WHATSAPPD_SDHARNESS"


def leftovers() -> set[Path]:
    """What runs of the proof may leave in /var/tmp."""
    return set(SCRATCH.glob("whatsappd-proof*"))


@pytest.mark.slow
@pytest.mark.root
@pytest.mark.timeout(1500)
def test_the_units_work_under_a_real_systemd() -> None:
    """sdharness-proof.sh passes: every check of the units under systemd 252, security score <= 2.0;
    and without a cache it leaves nothing in /var/tmp."""
    if os.geteuid() != 0:
        pytest.skip("sdharness needs root")
    path, how = harness()
    if not path.is_file():
        pytest.skip(f"no sdharness at {path} ({how})")
    cache = os.environ.get("WHATSAPPD_PROOF_CACHE")
    before = leftovers()
    result = subprocess.run(["bash", str(ROOT / "tests" / "systemd" / "sdharness-proof.sh")],
                            env={**os.environ, "WHATSAPPD_SDHARNESS": str(path)}, cwd=ROOT, capture_output=True,
                            text=True, timeout=1450, stdin=subprocess.DEVNULL)
    tail = (result.stdout + result.stderr)[-6000:]
    assert result.returncode == 0, tail
    assert "\nPASS" in result.stdout, tail
    assert " 0 failed" in result.stdout, tail
    if not cache:
        assert leftovers() <= before, f"left in {SCRATCH}: {sorted(map(str, leftovers() - before))}"
