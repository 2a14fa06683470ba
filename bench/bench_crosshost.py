#!/usr/bin/env python3
"""Issue 13 benchmark: event-stream latency on the host that commits an event and on another host.

    .venv/bin/python bench/bench_crosshost.py [--events 2000] [--rate 200] [--rounds 3] [--json out.json] [--keep]

A real PostgreSQL server (whatsappd.testing.postgres, in a temporary directory), two real
`whatsappd run` daemons on one database: host A runs simulator company acme, host B none. Each
round, A's worker emits --events incoming messages paced at --rate (`simulate burst`); two
stream readers (GET /v1/events), one on A and one on B, time each event from its
`emitted_at_ns` (the worker's clock just before it writes it) to its arrival. On A the event
takes the local path (group commit, then the bus); on B the journal tail (LISTEN wake-up, then
a SELECT). Figures: p50 / p99 / max per host (median over rounds), and the events B missed or
saw twice (must be 0). Prints figures, asserts no timing; exits 1 if B lost or repeated an
event. On a checkout without the journal tail (before issue 13), B sees nothing: its figures
read "none" and A's are the "before" of the same-host figure.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from whatsappd.testing.events import EventReader  # noqa: E402
from whatsappd.testing.postgres import PostgresServer  # noqa: E402
from whatsappd.testing.scenario import SimDaemon, sim_config  # noqa: E402


def say(*parts: Any) -> None:
    print(*parts, file=sys.stderr, flush=True)


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=2000, help="events per round")
    parser.add_argument("--rate", type=float, default=200.0, help="events per second")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", type=Path, help="write the raw figures here")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory (logs)")
    args = parser.parse_args()

    root = Path(tempfile.mkdtemp(prefix="bench-crosshost-"))
    server = PostgresServer().start()
    daemons: list[SimDaemon] = []
    try:
        dsn = server.create_database()
        store = {"backend": "postgresql", "dsn": dsn}
        quiet = {"logging": {"level": "warning"}, "events": {"reader_buffer": 100_000}}
        a = SimDaemon(root / "a", sim_config("acme", cluster={"host_id": "host-a"}, **quiet), store=store)
        b = SimDaemon(root / "b", sim_config(cluster={"host_id": "host-b"}, **quiet), store=store)
        daemons += [a, b]
        a.start(timeout=60)
        b.start(timeout=60)
        a.pair("acme", timeout=60)
        rounds: dict[str, list[dict[str, float]]] = {"same_host": [], "across_hosts": []}
        faults = 0
        for n in range(args.rounds):
            text = f"round{n}"
            say(f"round {n + 1}/{args.rounds}: {args.events} events at {args.rate:g}/s from host A")
            with EventReader(str(a.socket_path), "type=message.incoming") as on_a, \
                    EventReader(str(b.socket_path), "type=message.incoming") as on_b:
                response = a.simulate("acme", "burst", count=args.events, text=text, rate=args.rate)
                assert response.status == 200, response.body
                got_a = [x for x in on_a.wait_count(args.events, timeout=120)
                         if str(x.get("text", "")).startswith(text + " ")]
                try:
                    got_b = [x for x in on_b.wait_count(args.events, timeout=30)
                             if str(x.get("text", "")).startswith(text + " ")]
                except TimeoutError:
                    got_b = [x for x in on_b.events() if str(x.get("text", "")).startswith(text + " ")]
            seqs_a, seqs_b = [x["seq"] for x in got_a], [x["seq"] for x in got_b]
            if got_b:
                faults += len(set(seqs_a) - set(seqs_b)) + (len(seqs_b) - len(set(seqs_b)))
            for case, lines in (("same_host", got_a), ("across_hosts", got_b)):
                ms = [(x.arrived_wall * 1e9 - int(x["emitted_at_ns"])) / 1e6 for x in lines]
                if ms:
                    rounds[case].append({"p50": pct(ms, 0.5), "p99": pct(ms, 0.99), "max": max(ms), "n": len(ms)})
        for daemon in daemons:
            daemon.stop()
        out: dict[str, Any] = {case: ({k: round(statistics.median(r[k] for r in rows), 2) for k in ("p50", "p99", "max")}
                                      if rows else None) for case, rows in rounds.items()}
        out.update(rounds=rounds, events=args.events, rate=args.rate, lost_or_repeated_on_b=faults)
        print(f"event-stream latency, worker emit -> reader, {args.events} events at {args.rate:g}/s, "
              f"median of {args.rounds} rounds (ms):")
        for case in ("same_host", "across_hosts"):
            fig = out[case]
            print(f"  {case:13} " + ("none (this host saw no event)" if fig is None else
                                      f"p50 {fig['p50']:7.2f}  p99 {fig['p99']:7.2f}  max {fig['max']:7.2f}"))
        print(f"  events host B missed or saw twice: {faults} (target 0)")
        if args.json:
            args.json.write_text(json.dumps(out, indent=2))
        return 1 if faults else 0
    finally:
        for daemon in daemons:
            daemon.kill()
        server.stop()
        if args.keep:
            say(f"kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
