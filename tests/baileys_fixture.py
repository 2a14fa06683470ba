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
JID = "5511999990000:12@s.whatsapp.net"
PEER_A = "session-5511888880001.0.json"


# ------------------------------------------------------------------ helpers


def age(path: Path, seconds: float = 3600) -> None:
    """Set the mtime of path and everything in it to `seconds` ago (Baileys long stopped)."""
    when = time.time() - seconds
    for p in [*path.rglob("*"), path]:
        os.utime(p, (when, when), follow_symlinks=False)


def baileys_copy(root: Path, name: str = "session-7") -> Path:
    """A copy of the fixture folder under root, aged an hour."""
    root.mkdir(parents=True, exist_ok=True)
    dest = root / name
    shutil.copytree(FIXTURE / "session-7", dest)
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
    """The fixture in Baileys 7's layout (from Baileys 7's sources): contact A addressed by LID,
    LID mappings, identity-key files, device lists, privacy tokens, sender keys stored as a
    Buffer of their JSON."""
    source = baileys_copy(root)
    (source / PEER_A).rename(source / "session-987654321_1.0.json")
    record = json.loads((source / "session-987654321_1.0.json").read_text())
    remote = next(iter(record["_sessions"].values()))["indexInfo"]["remoteIdentityKey"]
    files: dict[str, Any] = {
        "lid-mapping-5511888880001.json": "987654321",
        "lid-mapping-987654321_reverse.json": "5511888880001",
        "identity-key-987654321_1.0.json": {"type": "Buffer", "data": remote},
        "device-list-5511888880001.json": ["0"],
        "tctoken-987654321@lid.json": {"token": {"type": "Buffer", "data": base64.b64encode(b"tc-token").decode()},
                                       "timestamp": "1796100000"},
        "tctoken-__index.json": {"token": {"type": "Buffer", "data": base64.b64encode(b'["987654321@lid"]').decode()}},
    }
    for name, value in files.items():
        (source / name).write_text(json.dumps(value))
    sender = source / "sender-key-120363025555555555@g.us--5511999990000--12.json"
    sender.write_text(json.dumps({"type": "Buffer", "data": base64.b64encode(sender.read_bytes()).decode()}))
    age(source)
    return source


