"""Open a converted store with neonize, in a subprocess, and list its devices. No network
(but the PostgreSQL server a `postgresql://` store names).

`python -m whatsappd.baileys.verify STORE` prints one line `RESULT {"devices": [...]}` (or
`{"error": ...}`). It calls goneonize's `GetAllDevices`, which opens the store exactly as a
worker does (whatsmeow's `sqlstore.New`: schema version check, then `scanDevice`, which rebuilds
every key pair from its private key and rejects wrong lengths). It never creates a client and
never connects. A subprocess because loading the Go library changes process-wide state
(logging, threads) that the caller must not inherit.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import urllib.parse
from pathlib import Path

__all__ = ["listed_jids"]

_MARK = "RESULT "
_SEPARATOR = "|\x01|"  # goneonize's delimiter between devices


def _is_dsn(store: Path | str) -> bool:
    """A PostgreSQL URL (goneonize opens a name starting with "postgres" with lib/pq), not a file."""
    return isinstance(store, str) and store.startswith("postgres")


def listed_jids(store: Path | str, timeout: float = 60.0) -> list[str]:
    """The JIDs neonize lists in store (a SQLite file, or a PostgreSQL URL: opening it creates or
    upgrades whatsmeow's schema there); raises RuntimeError saying why it could not open it."""
    env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}
    try:
        with tempfile.TemporaryDirectory(prefix="whatsappd-verify-") as scratch:
            # A DSN runs in an empty scratch directory: goneonize tries SQLite before lib/pq.
            cwd = scratch if _is_dsn(store) else Path(store).parent
            # A DSN goes through stdin ("-"), not argv, which any local user can read in ps.
            arg, given = ("-", str(store)) if _is_dsn(store) else (str(store), "")
            proc = subprocess.run([sys.executable, "-m", "whatsappd.baileys.verify", arg], cwd=cwd, env=env,
                                  input=given, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"neonize did not open the store within {timeout:g} s") from None
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(_MARK):
            try:
                result = json.loads(line[len(_MARK):])
            except ValueError:
                raise RuntimeError(f"the neonize check printed an unreadable result: {line[:200]}") from None
            if "error" in result:
                raise RuntimeError(f"neonize could not open the store: {result['error']}")
            return [str(jid) for jid in result["devices"]]
    tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
    raise RuntimeError(f"the neonize check exited with status {proc.returncode}: {tail}")


def _main(store: str) -> int:
    import logging

    logging.disable(logging.CRITICAL)  # neonize configures logging on import; none of it is wanted
    from neonize._binder import func_callback_bytes2, gocode
    from neonize.utils.log import log_whatsmeow

    # goneonize opens "file:{name}?_foreign_keys=on"; SQLite decodes the URI, so a path is quoted.
    name = store if _is_dsn(store) else urllib.parse.quote(store, safe="/")
    raw = gocode.GetAllDevices(name.encode(), func_callback_bytes2(log_whatsmeow))
    text = raw.decode() if isinstance(raw, bytes) else str(raw)
    if text.startswith("error: "):
        result: dict[str, object] = {"error": text.removeprefix("error: ")}
    else:
        # each device: "jid,push name,business name,initialized"; the JID never holds a comma
        result = {"devices": [d.split(",", 1)[0] for d in text.split(_SEPARATOR) if d]}
    print(_MARK + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    given = sys.stdin.readline().strip() if sys.argv[1:] == ["-"] else (sys.argv[1] if len(sys.argv) == 2 else "")
    if not (_is_dsn(given) or (given and Path(given).is_file())):
        print("usage: python -m whatsappd.baileys.verify STORE (an existing file), or - with a postgresql:// "
              "URL on stdin", file=sys.stderr)
        sys.exit(2)
    code = _main(given)
    sys.stdout.flush()
    os._exit(code)  # the Go runtime's threads must not keep the process alive
