"""Cold starts on an empty PostgreSQL database (issue 13): hosts started at once never quarantine.

whatsmeow's own schema upgrade takes no lock: two neonize clients cold-starting on an empty
database failed it ("failed to upgrade database") 7 times in 10 in the cluster research, and
whatsappd used to read that as a broken store and quarantine the company. Now the daemon
migrates whatsmeow's schema once under the migration lock before any worker starts, and the
message is transient anyway.

Starts its own PostgreSQL (whatsappd.testing.postgres), then --rounds times (default 20): a new
empty database, --hosts daemons (default 3) started at once with --per-host neonize companies
each (default 2), every company connected at once, each dialing only a refusing SOCKS5 listener
on 127.0.0.1 (whatsappd.testing.whatsmeow_pg.cold_start_round, the test's code); counts
quarantined or failed companies and workers that met the upgrade race. Prints a table; exits 1
if any company was quarantined. About 10 s a round.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from tempfile import TemporaryDirectory

from whatsappd.testing.postgres import PostgresServer
from whatsappd.testing.scenario import daemon_pool
from whatsappd.testing.socks5 import Socks5FaultProxy
from whatsappd.testing.whatsmeow_pg import cold_start_round, quarantines
from whatsappd.worker.relay import LOOPBACK_ONLY_ENV


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--hosts", type=int, default=3)
    parser.add_argument("--per-host", type=int, default=2)
    args = parser.parse_args()
    os.environ[LOOPBACK_ONLY_ENV] = "1"  # no worker may dial past loopback, whatever happens
    server = PostgresServer().start()
    quarantined = races = 0
    seconds: list[float] = []
    try:
        with TemporaryDirectory(prefix="whatsappd-bench-pg-") as tmp, Socks5FaultProxy(mode="refuse") as proxy:
            for n in range(args.rounds):
                dsn = server.create_database()
                started = time.monotonic()
                with daemon_pool(Path(tmp) / f"round{n}") as make:
                    made = cold_start_round(make, proxy, dsn, args.hosts, args.per_host)
                    seconds.append(time.monotonic() - started)
                    found = sum(quarantines(d, dsn) for d in made)
                    met = sum(len(d.log_lines("store_upgrade_race")) for d in made)
                    quarantined += found
                    races += met
                    for d in made:
                        d.stop()
                print(f"round {n + 1:2}/{args.rounds}: {args.hosts} hosts x {args.per_host} companies, "
                      f"all dialed in {seconds[-1]:.1f} s; quarantined {found}, upgrade races met {met}", file=sys.stderr,
                      flush=True)
    finally:
        server.stop()
    print("| rounds | hosts | companies/host | quarantined | upgrade races met by workers | round p50 s |")
    print("|---|---|---|---|---|---|")
    print(f"| {args.rounds} | {args.hosts} | {args.per_host} | {quarantined} | {races} | "
          f"{sorted(seconds)[len(seconds) // 2]:.1f} |")
    sys.exit(1 if quarantined else 0)


if __name__ == "__main__":
    main()
