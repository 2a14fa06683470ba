"""One lease "host" as a process of its own, for the lease tests and bench/bench_leases.py:
`python -m whatsappd.testing.lease_host --dsn DSN --host h1 --log FILE [--ttl ... ]`.

It runs a real `LeaseKeeper` and appends one JSON line per fact to its own log file, stamped
with CLOCK_MONOTONIC (system-wide on Linux, so several processes' stamps compare):
`{"ev": "acquired", "company", "token", "mono"}`, `{"ev": "lost", "company", "token", "reason",
"deadline", "mono"}`, `{"ev": "stmt", "kind", "mono"}` just before each statement is sent, and
`{"ev": "ready", "pid", "mono"}` once. Being a separate process makes kill -9 and
SIGSTOP/SIGCONT real.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import time
from pathlib import Path
from typing import Any

from whatsappd.cluster.leases import LeaseKeeper, Leases, Loss

__all__ = ["read_log"]


def read_log(path: Path) -> list[dict[str, Any]]:
    """The complete lines of a host's log (a killed host may leave half a line)."""
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dsn", required=True)
    parser.add_argument("--host", required=True)
    parser.add_argument("--log", required=True, type=Path)
    parser.add_argument("--ttl", type=float, default=1.5)
    parser.add_argument("--renew", type=float, default=0.25)
    parser.add_argument("--margin", type=float, default=0.5)
    parser.add_argument("--cap", type=int, default=400)
    args = parser.parse_args()
    fd = os.open(args.log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)

    def write(**fields: Any) -> None:
        os.write(fd, (json.dumps({"mono": time.monotonic(), **fields}) + "\n").encode())

    def lost(loss: Loss) -> None:
        write(ev="lost", company=loss.company, token=loss.token, reason=loss.reason, deadline=loss.deadline)

    def acquired(company: str, token: int) -> None:
        write(ev="acquired", company=company, token=token)

    leases = Leases(args.dsn, args.host, args.ttl, args.cap, trace=lambda kind: write(ev="stmt", kind=kind))
    keeper = LeaseKeeper(leases, renew_interval=args.renew, fence_margin=args.margin, on_lost=lost,
                         on_acquired=acquired)
    write(ev="ready", pid=os.getpid())
    asyncio.run(keeper.run())


if __name__ == "__main__":
    main()
