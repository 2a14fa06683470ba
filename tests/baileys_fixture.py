"""Test helpers: copies of the shared Baileys fixture (tests/fixtures/baileys/, synthetic keys only)."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "baileys"
FIXTURE7 = Path(__file__).resolve().parent / "fixtures" / "baileys7"  # made by Baileys 7
JID = "5511999990000:12@s.whatsapp.net"
PEER_A = "session-5511888880001.0.json"


# ------------------------------------------------------------------ helpers


def age(path: Path, seconds: float = 3600) -> None:
    """Set the mtime of path and everything in it to `seconds` ago (Baileys long stopped)."""
    when = time.time() - seconds
    for p in [*path.rglob("*"), path]:
        os.utime(p, (when, when), follow_symlinks=False)


def baileys_copy(root: Path, name: str = "session-7", fixture: Path = FIXTURE / "session-7") -> Path:
    """A copy of a fixture folder (Baileys 6 by default) under root, aged an hour."""
    root.mkdir(parents=True, exist_ok=True)
    dest = root / name
    shutil.copytree(fixture, dest)
    for p in dest.iterdir():
        p.chmod(0o600)
    age(dest)
    return dest


def tree(path: Path) -> dict[str, tuple[int, str, int]]:
    """Every file under path with its mode, sha256 and mtime: to prove nothing changed."""
    out = {}
    for p in sorted(path.rglob("*")):
        st = p.lstat()
        digest = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else ""
        out[str(p.relative_to(path))] = (st.st_mode, digest, st.st_mtime_ns)
    return out


def edit(folder: Path, name: str, change: Any) -> None:
    """Rewrite one JSON file of the copy through change(obj) and age the folder again."""
    path = folder / name
    obj = json.loads(path.read_text())
    change(obj)  # changes obj in place
    path.write_text(json.dumps(obj))
    age(folder)


def flip_bit(b64: str, byte: int = 10, bit: int = 3) -> str:
    data = bytearray(base64.b64decode(b64))
    data[byte] ^= 1 << bit
    return base64.b64encode(bytes(data)).decode()


def baileys7(root: Path) -> Path:
    """A copy of the Baileys 7 fixture folder (session-8) under root, aged an hour."""
    return baileys_copy(root, "session-8", FIXTURE7 / "session-8")


def assert_restored_never_paired(d: Any, company: str, proxy: Any, attempts: int = 1) -> None:
    """d (a SimDaemon) runs company's imported device: its worker started in restore mode and
    dialed WhatsApp (through proxy, a refusing 127.0.0.1 listener) to log in, never to pair."""
    from whatsappd.testing.daemon import wait_until

    wait_until(lambda: len(proxy.requests) >= attempts, 40, what="login attempts through the proxy")
    states = [line.get("new") for line in d.log_lines("state changed", company=company)]
    assert "pairing" not in states, states
    starts = d.log_lines("worker started", company=company)
    assert starts and {s["mode"] for s in starts} == {"restore"}  # the supervisor saw a paired session
    dials = d.log_lines("dialing", company=company)
    assert dials and not any(line["pair"] for line in dials)  # the worker dialed to log in
    assert not d.log_lines("qr_issued")
    assert set(proxy.requests) == {("web.whatsapp.com", 443)}
