#!/usr/bin/env python3
"""Issue 12 benchmark: send pacing in real time. Prints figures; exits 1 when a figure misses.

    .venv/bin/python bench/bench_pacing.py [--rate 6/min] [--burst 3] [--count 30] [--json out.json] [--keep]

The issue's acceptance scenario, unscaled: a real `whatsappd run` with one simulator company
paced at 6/min, burst 3 (every other [pacing] key at its default: jitter 3 s, "typing…" 40 ms a
character up to 6 s). The recipient wrote to the number first (`simulate incoming`), so the
first-contact budget is not what paces it. The company's network is dropped, 30 messages are
queued, the network comes back, and the bench waits until all are sent (about 4.5 minutes).

What it checks, from the simulator's send log on disk (the "server": one fsync'ed line per
message WhatsApp received, with its time in milliseconds) and nothing of the daemon's own:
- each message sent once, in the order it was queued;
- every send fits the token bucket (rate, burst), full at the first send, forgiving 2 ms of
  timestamp rounding per send (whatsappd.pacing.bucket_violations, as the tests use it);
- a "typing…" presence before each text (simulator-presence.jsonl), as long as its length says.
It prints the span, the gaps, and how long after the bucket allowed it each send went (jitter,
typing and the daemon's own delay). Exit status 0: every check held; 1: a check missed.

Every process it starts is ended by pid (the daemon with SIGTERM; its workers die with it).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
HERE = Path(__file__).resolve().parent
for p in (str(REPO), str(HERE)):
    if p not in sys.path:
        sys.path.insert(0, p)

from bench_supervisor import machine  # noqa: E402

from whatsappd.pacing import PacingPolicy, bucket_slack, bucket_violations, parse_rate  # noqa: E402
from whatsappd.testing.metrics import metric_value  # noqa: E402
from whatsappd.testing.scenario import SimDaemon, parse_iso  # noqa: E402
from whatsappd.worker.simulator.server import PRESENCE_LOG_FILE, read_send_log, send_log_stats  # noqa: E402

RECIPIENT = "5511987650001"
COMPANY = "paced"


def say(*parts: Any) -> None:
    print(*parts, file=sys.stderr, flush=True)


def config(rate: str, burst: int) -> str:
    return "\n".join([
        "[logging]", 'format = "json"', 'level = "info"',
        "[reconnect]", 'initial_delay = "100ms"', 'max_delay = "1s"', "connect_rate = 100",
        "[pacing]", f'rate = "{rate}"', f"burst = {burst}",
        "[[companies]]", f'id = "{COMPANY}"', 'engine = "simulator"',
    ]) + "\n"


def run(args: argparse.Namespace, base: Path) -> tuple[dict[str, Any], list[str]]:
    started_on = machine()
    rate = parse_rate(args.rate)
    policy = PacingPolicy(rate=rate, burst=args.burst)  # the other keys at their defaults
    d = SimDaemon(base / "d", config=config(args.rate, args.burst))
    d.start(timeout=30)
    try:
        d.pair(COMPANY, timeout=30)
        assert d.simulate(COMPANY, "incoming", **{"from": RECIPIENT}).status == 200  # a known contact
        assert d.simulate(COMPANY, "drop", down=True).status == 200
        d.wait_state(COMPANY, "reconnecting")
        texts = [f"Olá! Mensagem {n + 1} de {args.count} sobre o imóvel que você viu." for n in range(args.count)]
        ids = []
        for text in texts:
            response = d.client.post(f"/v1/companies/{COMPANY}/messages", {"to": f"+{RECIPIENT}", "text": text})
            assert response.status == 202, response.body
            ids.append(response.json()["id"])
        assert d.simulate(COMPANY, "restore").status == 200
        restored = time.time()
        expected = (args.count - args.burst) / rate.per_second
        say(f"queued {args.count}; the bucket lets them out over at least {expected:.0f} s")
        deadline = restored + expected * 1.5 + 120
        last_note = 0.0
        while True:
            sent = len(read_send_log(d.session_dir(COMPANY)))
            if sent >= args.count or time.time() > deadline:
                break
            if time.time() - last_note >= 30:
                snap = d.client.get(f"/v1/companies/{COMPANY}").json()["sending"]
                say(f"  {time.time() - restored:5.0f} s: {sent}/{args.count} sent; sending {snap['state']} "
                    f"until {snap['until']}")
                last_note = time.time()
            time.sleep(0.5)
        time.sleep(1.0)  # a duplicate would show up now
        records = read_send_log(d.session_dir(COMPANY))
        presence = [json.loads(line) for line in
                    (d.session_dir(COMPANY) / PRESENCE_LOG_FILE).read_text().splitlines() if line]
        duplicates = send_log_stats(d.session_dir(COMPANY)).duplicate_requests
        metrics = d.client.get("/v1/metrics").body.decode()
    finally:
        code = d.stop(timeout=60)
        if args.keep:
            say(f"kept {base}")
    problems: list[str] = []
    if code != 0:
        problems.append(f"the daemon exited with {code}")
    order = [r["outbox_id"] for r in records]
    if order != ids:
        problems.append(f"sent {len(order)} of {len(ids)}, or not in the queued order, or some twice")
    if duplicates:
        problems.append(f"{duplicates} duplicate send requests")
    times = [parse_iso(r["timestamp"]) for r in records]
    problems += bucket_violations(times, rate.per_second, args.burst)
    typing_expected = [policy.typing_for("text", t) for t in texts]
    typing_seen = [p["seconds"] for p in presence]
    if typing_seen[:len(records)] != typing_expected[:len(records)]:
        problems.append(f"typing presence {typing_seen[:3]}… differs from the expected {typing_expected[:3]}…")
    gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
    slack = bucket_slack(times, rate.per_second, args.burst)
    figures = {
        "machine": started_on,
        "rate": args.rate, "burst": args.burst, "count": args.count, "jitter_s": policy.jitter,
        "typing_s_each": typing_expected[0] if typing_expected else 0,
        "sent": len(records), "in_order_once": order == ids and not duplicates,
        "span_s": times[-1] - times[0] if times else 0.0, "span_floor_s": expected,
        "burst_gaps_s": gaps[:args.burst - 1],
        "steady_gap_min_s": min(gaps[args.burst - 1:], default=0.0),
        "steady_gap_median_s": statistics.median(gaps[args.burst - 1:]) if gaps[args.burst - 1:] else 0.0,
        "steady_gap_max_s": max(gaps[args.burst - 1:], default=0.0),
        "slack_min_s": min(slack[1:], default=0.0), "slack_median_s": statistics.median(slack[1:]) if slack[1:] else 0.0,
        "slack_max_s": max(slack[1:], default=0.0),
        "bucket_violations": len([p for p in problems if "bucket" in p]),
        "metrics_queue_depth_0": metric_value(metrics, "whatsappd_outbox_pending_messages", company=COMPANY) == 0,
        "loadavg_end": Path("/proc/loadavg").read_text().split()[:3],
    }
    return figures, problems


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rate", default="6/min", help='the bucket\'s rate (default "6/min")')
    p.add_argument("--burst", type=int, default=3, help="the bucket's burst (default 3)")
    p.add_argument("--count", type=int, default=30, help="messages queued (default 30)")
    p.add_argument("--json", type=Path, help="also write every figure to this file")
    p.add_argument("--keep", action="store_true", help="keep the temporary directory (daemon log, send log)")
    args = p.parse_args()
    base = Path(tempfile.mkdtemp(prefix="wbench-pacing-"))
    started = time.monotonic()
    try:
        figures, problems = run(args, base)
    finally:
        if not args.keep:
            shutil.rmtree(base, ignore_errors=True)
    m = figures["machine"]
    print(f"machine: {m['nproc']} CPUs ({m['cpu_model']}), Python {m['python']}, {m['date']}, "
          f"load {' '.join(m['loadavg_start'])} -> {' '.join(figures['loadavg_end'])}; took {time.monotonic() - started:.0f} s")
    rows = [
        ("scenario", f"{figures['count']} messages, rate {figures['rate']}, burst {figures['burst']}, jitter "
                     f"{figures['jitter_s']:g} s, typing {figures['typing_s_each']:g} s each"),
        ("sent, in order, each once", f"{figures['sent']}/{figures['count']}, {figures['in_order_once']}"),
        ("span first -> last send", f"{figures['span_s']:.1f} s (bucket floor {figures['span_floor_s']:.1f} s)"),
        ("gaps inside the burst", ", ".join(f"{g:.2f} s" for g in figures["burst_gaps_s"])),
        ("gaps after it: min / median / max", f"{figures['steady_gap_min_s']:.2f} / {figures['steady_gap_median_s']:.2f}"
                                               f" / {figures['steady_gap_max_s']:.2f} s"),
        ("after the bucket allowed: min / median / max", f"{figures['slack_min_s']:.3f} / "
                                                          f"{figures['slack_median_s']:.3f} / {figures['slack_max_s']:.3f} s"),
        ("sends that did not fit the bucket", str(figures["bucket_violations"])),
    ]
    width = max(len(r[0]) for r in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value}")
    if args.json:
        args.json.write_text(json.dumps({**figures, "problems": problems}, indent=2))
    for problem in problems:
        print(f"MISS: {problem}")
    print("OK: every check held" if not problems else f"FAILED: {len(problems)} check(s) missed")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
