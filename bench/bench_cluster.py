"""Several hosts on one PostgreSQL (issue 13): the acceptance scenarios at full size, with figures.

Starts its own PostgreSQL (whatsappd.testing.postgres) and real whatsappd hosts h1..h3
(whatsappd.testing.cluster: each a `whatsappd run` process tree with its own state directory
and socket, `[cluster] enabled = true`, one shared simulator server directory), 30 simulator
companies and a few neonize companies behind refusing 127.0.0.1 SOCKS5 listeners
(WHATSAPPD_LOOPBACK_ONLY=1: nothing dials past loopback). An independent checker samples every
100 ms: live workers per company per host from /proc, the simulator server's live connections,
the lease table. Scenarios (--only picks some):

- failover: >= 20 times, SIGKILL one host's whole process tree, time until every company it
  owned runs on another host with a higher token (simulator ones connected there), restart it,
  wait for the spread. p50/p95/max; target max < 30 s.
- freeze: SIGSTOP a host's tree for 2 x lease_ttl, SIGCONT; how many of its companies were
  taken, how long its stale workers lived after SIGCONT. Target: zero double-owner samples
  over failover + freeze.
- coldstart: 3 hosts started at once on an empty database, 20 times (neonize companies connect,
  so their workers open the whatsmeow store): quarantines; target 0.
- midsend: 1,000 messages queued across 10 companies, owners SIGKILLed twice mid-send: messages
  sent twice (target 0), send_interrupted reported.
- connections: PostgreSQL connections per host (pg_stat_activity by application_name) with
  neonize workers behind refusing proxies, at --scales companies, without and with PgBouncer
  (transaction pooling) for the whatsmeow DSN.
- stream: event-stream latency on the committing host and across hosts: bench/bench_crosshost.py,
  run as it is (its own PostgreSQL and two hosts).

Timings are the shipped defaults (lease_ttl 15 s, renew_interval 5 s, fence_margin 3 s) unless
--ttl/--renew/--margin say otherwise. Prints figures; exits 1 if a target is missed.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from whatsappd.testing.cluster import (
    Checker,
    Cluster,
    freeze_and_thaw,
    kill_and_failover,
    quarantined,
    send_and_kill,
    wait_balanced,
)
from whatsappd.testing.daemon import wait_until
from whatsappd.testing.postgres import PostgresServer
from whatsappd.testing.socks5 import Socks5FaultProxy

FAILOVER_TARGET = 30.0
SCENARIOS = ("failover", "freeze", "coldstart", "midsend", "connections", "stream")


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


def spread(values: list[float]) -> str:
    if not values:
        return "n/a"
    return (f"p50 {percentile(values, 50):.2f} s, p95 {percentile(values, 95):.2f} s, max {max(values):.2f} s "
            f"(n={len(values)})")


class Bench:
    def __init__(self, args: argparse.Namespace, pg: PostgresServer, root: Path) -> None:
        self.args, self.pg, self.root = args, pg, root
        self.misses: list[str] = []
        self.runs = 0

    def miss(self, what: str) -> None:
        print(f"  MISSED: {what}", flush=True)
        self.misses.append(what)

    @contextlib.contextmanager
    def cluster(self, companies: int, neonize: int = 0, hosts: int = 3, env: dict[str, str] | None = None,
                **config: Any) -> Iterator[Cluster]:
        """A fresh database and hosts; neonize companies each behind a refusing SOCKS5 listener."""
        self.runs += 1
        proxies = [Socks5FaultProxy("refuse").start() for _ in range(neonize)]
        timings = {"lease_ttl": self.args.ttl, "renew_interval": self.args.renew, "fence_margin": self.args.margin}
        cluster = Cluster(self.root / f"run{self.runs}", self.pg.create_database(),
                          [f"sim{i:03d}" for i in range(companies)], hosts=hosts,
                          neonize={f"neo{i:03d}": p.url for i, p in enumerate(proxies)}, env=env,
                          workers={"heartbeat_timeout": "20s"}, **{**timings, **config})
        try:
            yield cluster
        finally:
            cluster.stop()
            for proxy in proxies:
                proxy.stop()
            shutil.rmtree(cluster.root, ignore_errors=True)

    # ---------------------------------------------------------------------------------------

    def failover_and_freeze(self, run_failover: bool, run_freeze: bool) -> None:
        a = self.args
        with self.cluster(a.companies, a.neonize) as cluster:
            began = time.monotonic()
            cluster.pre_pair()
            cluster.start()
            wait_balanced(cluster, cluster.companies)
            print(f"  {a.companies} simulator (paired) + {a.neonize} neonize companies on 3 hosts, spread in "
                  f"{time.monotonic() - began:.1f} s", flush=True)
            with Checker(cluster) as checker:
                if run_failover:
                    self.failover(cluster)
                if run_freeze:
                    self.freeze(cluster)
            print(f"checker: {len(checker.samples)} samples over {checker.samples[-1].at - checker.samples[0].at:.0f} s"
                  f" (mean interval {self.mean_interval(checker):.3f} s), max live workers {max(s.workers for s in checker.samples)}, "
                  f"max frozen {max(s.frozen for s in checker.samples)}; double-owner samples: "
                  f"{checker.double_owner_samples()}; token went down: "
                  f"{sum(v.kind == 'token_down' for v in checker.violations)}; sampling errors: {len(checker.errors)}",
                  flush=True)
            for v in checker.violations[:10]:
                print(f"  violation at +{v.at - checker.samples[0].at:.2f} s: {v.company} {v.kind} {v.detail}")
            if checker.double_owner_samples() or any(v.kind == "token_down" for v in checker.violations):
                self.miss("double-owner samples (target 0)")

    @staticmethod
    def mean_interval(checker: Checker) -> float:
        times = [s.at for s in checker.samples]
        return statistics.mean(b - a for a, b in zip(times, times[1:], strict=False)) if len(times) > 1 else 0.0

    def failover(self, cluster: Cluster) -> None:
        print(f"failover: {self.args.kills} x SIGKILL of one host's process tree, then its restart", flush=True)
        times: list[float] = []
        per_company: list[float] = []
        for k in range(self.args.kills):
            victim = cluster.hosts[k % len(cluster.hosts)]
            wait_balanced(cluster, cluster.companies, timeout=180)
            result = kill_and_failover(cluster, victim, connected=cluster.companies)
            times.append(result.seconds)
            per_company.append(len(result.before))
            higher = all(result.after[c][1] > t for c, t in result.before.items())
            print(f"  kill {k + 1:2d}: {victim.host_id} owned {len(result.before):2d}; all running elsewhere after "
                  f"{result.seconds:5.2f} s; tokens higher: {higher}", flush=True)
            cluster.restart(victim)
        print(f"  failover after kill -9: {spread(times)}; companies per kill: {min(per_company)}-{max(per_company)}",
              flush=True)
        if max(times) >= FAILOVER_TARGET:
            self.miss(f"failover max {max(times):.2f} s >= {FAILOVER_TARGET} s")

    def freeze(self, cluster: Cluster) -> None:
        seconds = 2 * self.args.ttl
        print(f"freeze: {self.args.stops} x SIGSTOP of one host's tree for {seconds:g} s, then SIGCONT", flush=True)
        fenced: list[float] = []
        for k in range(self.args.stops):
            victim = cluster.hosts[(k + 1) % len(cluster.hosts)]
            wait_balanced(cluster, cluster.companies, timeout=180)
            result = freeze_and_thaw(cluster, victim, seconds)
            fenced.append(result.fenced_after)
            print(f"  stop {k + 1}: {victim.host_id} owned {len(result.before)}, {result.taken} taken meanwhile; its "
                  f"stale workers gone {result.fenced_after * 1000:.0f} ms after SIGCONT", flush=True)
        print(f"  stale workers' life after SIGCONT: {spread(fenced)}", flush=True)

    def coldstart(self) -> None:
        a = self.args
        print(f"coldstart: {a.coldstarts} x 3 hosts started at once on an empty database "
              f"({a.companies} simulator + {a.neonize} neonize companies, the neonize ones connecting)", flush=True)
        times: list[float] = []
        total = 0
        for k in range(a.coldstarts):
            with self.cluster(a.companies, a.neonize) as cluster:
                began = time.monotonic()
                cluster.start()
                leases = cluster.wait_owned(timeout=120)
                times.append(time.monotonic() - began)
                for cid in cluster.neonize:  # each opens the whatsmeow store (pairing), then dials: refused
                    cluster.host(str(leases[cid].owner)).post(cid, "connect")
                wait_until(functools.partial(self.neonize_tried, cluster), 60, interval=0.2, what="every neonize worker to run")
                bad = quarantined(cluster)
                total += len(bad)
                print(f"  start {k + 1:2d}: all owned after {times[-1]:.2f} s; quarantined: {sorted(bad) or 'none'}",
                      flush=True)
        print(f"  cold starts: {a.coldstarts}, quarantines: {total}; time to all owned: {spread(times)}", flush=True)
        if total:
            self.miss(f"{total} quarantines in cold starts (target 0)")

    @staticmethod
    def neonize_tried(cluster: Cluster) -> bool:
        """Every neonize company's owner has started a worker for it at least once."""
        leases = cluster.leases()
        for cid in cluster.neonize:
            snap = cluster.snapshots(cluster.host(str(leases[cid].owner))).get(cid, {})
            if not snap.get("worker", {}).get("pid") and not snap.get("last_error") and snap.get("state") in (
                    None, "stopped", "disconnected"):
                return False
        return True

    def midsend(self) -> None:
        a = self.args
        print(f"midsend: {a.messages} messages over 10 companies, owners killed twice mid-send", flush=True)
        env = {"WHATSAPPD_SIM_SEND_DELAY": str(a.send_delay)}
        with self.cluster(10, 0, env=env) as cluster:
            cluster.pre_pair()
            cluster.start()
            with Checker(cluster) as checker:
                result = send_and_kill(cluster, cluster.companies, a.messages, kills=2, timeout=300)
            print(f"  killed {result.kills} when the server had {result.sent_at_kills} messages; "
                  f"server received {result.sent} unique, duplicates {result.duplicates}; "
                  f"send_interrupted {result.interrupted}; statuses {result.statuses}; "
                  f"double-owner samples {checker.double_owner_samples()}", flush=True)
            if result.duplicates:
                self.miss(f"{result.duplicates} messages sent twice (target 0)")
            if result.sent + result.interrupted < a.messages - result.statuses.get("failed", 0) + result.interrupted:
                self.miss("messages neither sent nor reported")

    def stream(self) -> None:
        """bench_crosshost.py prints its figures; its exit status is its verdict (lost or repeated events)."""
        print("stream: event latency on the committing host and across hosts (bench/bench_crosshost.py)", flush=True)
        done = subprocess.run([sys.executable, str(_crosshost()), "--rounds", str(self.args.stream_rounds)],
                              capture_output=True, text=True, timeout=1800)
        for line in (done.stdout + done.stderr).splitlines():
            print(f"  {line}", flush=True)
        if done.returncode != 0:
            self.miss(f"bench_crosshost.py exited {done.returncode}")

    def connections(self, scales: list[int]) -> None:
        """One host with n neonize companies connecting behind one 127.0.0.1 SOCKS5 listener
        (--proxy-mode: "silent" accepts and never answers, so every worker stays alive in its dial
        with its whatsmeow store open, the steady state of n live workers; "refuse" ends each dial
        at once, so workers exit and restart after a backoff); sampled for --sample seconds once
        the workers are up: the most connections seen and what they are per live worker, direct
        and with PgBouncer (transaction pooling) for the whatsmeow DSN."""
        print(f"connections: one host with n neonize companies behind a {self.args.proxy_mode} proxy, sampled "
              f"{self.args.sample:g} s; max_connections {self.pg.max_connections}", flush=True)
        for n in scales:
            for bounced in (False, True):
                try:
                    self.connections_at(n, bounced)
                except Exception as exc:  # noqa: BLE001 (one size failing still shows the others)
                    self.miss(f"connections at {n}{' with PgBouncer' if bounced else ''}: {type(exc).__name__}: {exc}")

    def connections_at(self, n: int, bounced: bool) -> None:
        from whatsappd.testing.pgbouncer import PgBouncer

        self.runs += 1
        with contextlib.ExitStack() as stack:
            proxy = stack.enter_context(Socks5FaultProxy(self.args.proxy_mode))
            dsn = self.pg.create_database()
            database = dsn.split("@/", 1)[1].split("?", 1)[0]
            bouncer = stack.enter_context(contextlib.closing(PgBouncer(self.pg).start())) if bounced else None
            cluster = stack.enter_context(Cluster(
                self.root / f"run{self.runs}", dsn, [], hosts=1, neonize={f"neo{i:04d}": proxy.url for i in range(n)},
                whatsmeow_dsn=bouncer.dsn(database) if bouncer else "", max_companies=max(n, 400),
                lease_ttl=self.args.ttl, renew_interval=self.args.renew, fence_margin=self.args.margin,
                workers={"heartbeat_interval": "5s", "heartbeat_timeout": "60s", "pairing_timeout": "1200s"},
                reconnect={"connect_rate": 20, "max_delay": "30s", "connect_timeout": "1200s"}))
            began = time.monotonic()
            cluster.start(timeout=120)
            host = cluster.hosts[0]
            cluster.wait_owned(timeout=300)
            def ask(cid: str) -> None:
                with contextlib.suppress(Exception):  # a connect answers once its worker started: slow at 1,000
                    host.post(cid, "connect")

            with ThreadPoolExecutor(16) as pool:
                list(pool.map(ask, cluster.neonize))
            if self.args.proxy_mode == "silent":
                for _ in range(3):  # ask again for any whose request was lost in a timeout
                    with contextlib.suppress(TimeoutError):
                        wait_until(lambda: len(cluster.workers()) >= n, 60 + n / 2, interval=1, what=f"{n} live workers")
                        break
                    snaps = cluster.snapshots(host)
                    with ThreadPoolExecutor(16) as pool:
                        list(pool.map(ask, [c for c in cluster.neonize if snaps.get(c, {}).get("state") == "stopped"]))
            print(f"  {n} companies{' + PgBouncer' if bounced else ''}: owned, connect asked (and the workers up) in "
                  f"{time.monotonic() - began:.1f} s", flush=True)
            peak = {"workers": 0, "daemon": 0, "whatsmeow": 0, "total": 0, "clients": 0}
            ratios: list[float] = []
            end = time.monotonic() + self.args.sample
            while time.monotonic() < end:
                workers = len([w for w in cluster.workers() if not w.frozen])
                rows = cluster.db.execute("SELECT application_name, count(*) FROM pg_stat_activity "
                                          "WHERE datname = current_database() GROUP BY 1").fetchall()
                by_name = {str(name): int(count) for name, count in rows}
                # The daemon's: its store's and lease loop's (whatsappd-h1) and its LISTEN ("whatsappd-listen h1").
                daemon = sum(count for name, count in by_name.items() if name.startswith("whatsappd"))
                whatsmeow = by_name.get("whatsmeow-h1", 0)
                clients = len([r for r in bouncer.show("CLIENTS") if len(r) > 2 and r[2] == database]) if bouncer else 0
                for key, value in (("workers", workers), ("daemon", daemon), ("whatsmeow", whatsmeow),
                                   ("total", sum(by_name.values())), ("clients", clients)):
                    peak[key] = max(peak[key], value)
                if workers:
                    ratios.append((clients if bouncer else whatsmeow) / workers)
                time.sleep(0.5)
            rss = sum(_rss(w.pid) for w in cluster.workers())
            via = (f"PgBouncer clients (workers' connections) max {peak['clients']}, PgBouncer's server "
                   f"connections max {peak['whatsmeow']}" if bouncer else f"whatsmeow connections max {peak['whatsmeow']}")
            print(f"    live neonize workers max {peak['workers']}; daemon's own connections max {peak['daemon']}; {via}; "
                  f"all connections to the database max {peak['total']}; workers' connections per live worker "
                  f"mean {statistics.mean(ratios) if ratios else 0:.2f}; workers' RSS now {rss / 2**20:.0f} MiB; "
                  f"load {os.getloadavg()[0]:.2f}", flush=True)


def _crosshost() -> Path:
    return Path(__file__).resolve().parent / "bench_crosshost.py"


def _rss(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", default=",".join(SCENARIOS), help=f"comma-separated subset of {SCENARIOS}")
    p.add_argument("--ttl", type=float, default=15.0)
    p.add_argument("--renew", type=float, default=5.0)
    p.add_argument("--margin", type=float, default=3.0)
    p.add_argument("--companies", type=int, default=30)
    p.add_argument("--neonize", type=int, default=3)
    p.add_argument("--kills", type=int, default=20)
    p.add_argument("--stops", type=int, default=5)
    p.add_argument("--coldstarts", type=int, default=20)
    p.add_argument("--messages", type=int, default=1000)
    p.add_argument("--send-delay", type=float, default=0.03, help="simulator seconds per send")
    p.add_argument("--scales", default="100,1000", help="company counts for the connections scenario")
    p.add_argument("--proxy-mode", default="silent", choices=("silent", "refuse"),
                   help="the neonize companies' SOCKS5 listener in the connections scenario")
    p.add_argument("--sample", type=float, default=30.0, help="seconds the connections scenario samples")
    p.add_argument("--stream-rounds", type=int, default=3, help="rounds of bench_crosshost.py")
    p.add_argument("--max-connections", type=int, default=1500, help="the test server's max_connections")
    args = p.parse_args(argv)
    only = set(args.only.split(","))
    # Stopped by a signal, still stop the hosts (a shell's background job starts with SIGINT ignored).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    os.environ["WHATSAPPD_LOOPBACK_ONLY"] = "1"
    print(f"machine: {os.cpu_count()} cores, {os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB; "
          f"load {os.getloadavg()[0]:.2f}; lease_ttl {args.ttl:g} s, renew_interval {args.renew:g} s, "
          f"fence_margin {args.margin:g} s", flush=True)
    pg = PostgresServer(max_connections=args.max_connections).start()
    root = Path(tempfile.mkdtemp(prefix="bench-cluster-"))
    bench = Bench(args, pg, root)
    try:
        steps: list[tuple[str, Callable[[], None]]] = []
        if only & {"failover", "freeze"}:
            steps.append(("failover/freeze", lambda: bench.failover_and_freeze("failover" in only, "freeze" in only)))
        if "coldstart" in only:
            steps.append(("coldstart", bench.coldstart))
        if "midsend" in only:
            steps.append(("midsend", bench.midsend))
        if "connections" in only:
            steps.append(("connections", lambda: bench.connections([int(n) for n in args.scales.split(",")])))
        if "stream" in only:
            steps.append(("stream", bench.stream))
        for name, step in steps:
            began = time.monotonic()
            try:
                step()
            except Exception as exc:  # noqa: BLE001 (a scenario that cannot finish is a miss; go on)
                bench.miss(f"{name}: {type(exc).__name__}: {exc}")
            print(f"({name}: {time.monotonic() - began:.0f} s; load {os.getloadavg()[0]:.2f})", flush=True)
    finally:
        pg.stop()
        shutil.rmtree(root, ignore_errors=True)
    if bench.misses:
        print(f"MISSED {len(bench.misses)} target(s): " + "; ".join(bench.misses))
        return 1
    print("all targets met")
    return 0


if __name__ == "__main__":
    sys.exit(main())
