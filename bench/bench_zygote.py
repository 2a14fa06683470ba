#!/usr/bin/env python3
"""Issue 9 benchmark: workers forked by a zygote against exec'd ones. Prints figures; asserts nothing.

    .venv/bin/python bench/bench_zygote.py [--sizes 10,50] [--messages 1000] [--cycles 1000] [--json F]

Phases (each figure next to its target from issue 9):

 1. memory, neonize: for each N in --sizes and each launcher (exec, zygote), N real workers
    (`whatsappd.supervisor.launcher`, with the arguments and environment the supervisor gives them) dial a
    silent SOCKS5 listener on 127.0.0.1. The figure is the marginal PSS per company: the PSS of
    every process the launcher runs (the zygote and the workers; `/proc/PID/smaps_rollup`)
    minus what the zygote alone took before it forked anything, divided by N. Then every
    worker handles --messages incoming messages through the real neonize event path (the
    engine's `replay`: serialized events through the ctypes callback neonize hands to Go, then
    neonize's dispatch, the engine's handler, the channel to the bench), and PSS again: the
    copy-on-write drift. Where the host runs kernel same-page merging (KSM: workers and zygotes
    ask for it, `/sys/kernel/mm/ksm/run` = 1 decides), each figure is taken after --ksm-scans
    more full scans of ksmd (the zygote's own figure too), and the KSM settings are printed.
 2. memory, simulator: the same with connected simulator workers and `simulate burst`.
 3. spawn -> `hello` latency: one worker at a time (median of --latency-runs), per launcher and
    engine, the zygote already up; plus a zygote's own boot.
 4. what each memory-saving step saves: neonize at N = --steps-size, with the zygote's steps
    switched off one by one (`--bench-*` zygote options, never used by the daemon).
 5. stress: --cycles connect/stop cycles over 20 neonize companies through a real daemon
    (`whatsappd run`, default launcher): crashes, leaked processes and fds.

The neonize workers never reach the network: every one is given `socks5://127.0.0.1:PORT`, a
`whatsappd.testing.socks5` listener in `silent` mode, and the bench refuses any other proxy.
Run as root, the whole bench re-runs itself in a fresh network namespace whose only interface
is loopback (`unshare --net`). Every process it starts is ended by pid.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
for path in (REPO, REPO / "bench"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

from bench_supervisor import machine, print_rows, say, smaps_rollup, write_simulator_sessions  # noqa: E402

from whatsappd.logs import configure_logging  # noqa: E402
from whatsappd.protocol import MAX_LINE, decode, encode  # noqa: E402
from whatsappd.supervisor.launcher import ZygoteLauncher  # noqa: E402
from whatsappd.supervisor.process import Launch, OsProcess, WorkerSpec, launch_subprocess  # noqa: E402
from whatsappd.testing.daemon import DaemonProcess, wait_until  # noqa: E402
from whatsappd.testing.socks5 import Socks5FaultProxy  # noqa: E402
from whatsappd.worker.neonize.engine import REPLAY_ENV  # noqa: E402

MiB = 1024.0
#: The supervisor's bound on workers booting at once (supervisor.MAX_BOOTING_WORKERS).
BOOTING_AT_ONCE = 8
#: Workers log as under a daemon with the default settings (their lines go to the bench's log
#: file, not the terminal).
LOG_LEVEL = "info"


# ------------------------------------------------------------------------------ a mini supervisor


class BenchWorker:
    """One worker started through a launcher, its channel read like the supervisor reads it."""

    def __init__(self, company: str, proc: OsProcess, reader: asyncio.StreamReader,
                 writer: asyncio.StreamWriter, spawned: float) -> None:
        self.company = company
        self.proc = proc
        self.reader = reader
        self.writer = writer
        self.spawned = spawned
        self.hello: float | None = None
        self.states: list[str] = []
        self.events = 0
        self.replies: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self.next_id = 1
        self.changed = asyncio.Event()
        self.task = asyncio.get_running_loop().create_task(self._read())

    async def _read(self) -> None:
        while line := await self.reader.readline():
            message = decode(line)
            kind = message["type"]
            if self.hello is None:
                self.hello = time.monotonic()
            if kind == "state":
                self.states.append(str(message.get("state")))
            elif kind == "event":
                self.events += 1
            elif kind == "reply" and message.get("id") in self.replies:
                self.replies.pop(message["id"]).set_result(message)
            self.changed.set()

    async def until(self, predicate: Callable[[BenchWorker], bool], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not predicate(self):
            if self.proc.returncode is not None:
                raise RuntimeError(f"{self.company}: worker exited with {self.proc.returncode} waiting for {what}")
            self.changed.clear()
            try:
                await asyncio.wait_for(self.changed.wait(), max(0.01, deadline - time.monotonic()))
            except TimeoutError:
                if time.monotonic() >= deadline:
                    raise RuntimeError(f"{self.company}: no {what} within {timeout:g}s") from None

    async def command(self, op: str, args: dict[str, Any], timeout: float = 120) -> dict[str, Any]:
        request_id, self.next_id = self.next_id, self.next_id + 1
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self.replies[request_id] = future
        self.writer.write(encode({"type": "command", "id": request_id, "company": self.company, "op": op,
                                  "args": args}))
        reply = await asyncio.wait_for(future, timeout)
        if not reply.get("ok"):
            raise RuntimeError(f"{self.company}: {op} failed: {reply.get('error')}")
        return dict(reply.get("result") or {})

    async def stop(self, grace: float = 10.0) -> int:
        if not self.writer.is_closing():
            self.writer.write(encode({"type": "stop"}))
        try:
            code = await asyncio.wait_for(self.proc.wait(), grace)
        except TimeoutError:
            self.proc.send_signal(signal.SIGKILL)
            code = await self.proc.wait()
        self.writer.close()
        await asyncio.gather(self.task, return_exceptions=True)
        return code


def make_launch(name: str, zygote_args: tuple[str, ...] = ()) -> Launch:
    """The launch the supervisor would use for `[workers] launcher = name`."""
    return ZygoteLauncher(LOG_LEVEL, zygote_args) if name == "zygote" else launch_subprocess


async def close_launch(launch: Launch) -> None:
    if isinstance(launch, ZygoteLauncher):
        await launch.close()


async def spawn(launch: Launch, engine: str, company: str, session_dir: Path, proxy: str | None) -> BenchWorker:
    """Start one worker the way Runner._run_worker does (the environment the supervisor gives it,
    plus the bench's switches, which main() puts in ours)."""
    spec = WorkerSpec(company=company, session_dir=session_dir, engine=engine, proxy=proxy,
                      pair=engine == "neonize",  # no session: the client dials at once (pairing)
                      heartbeat_interval=5.0, log_level=LOG_LEVEL)
    spawned = time.monotonic()
    proc, channel = await launch(spec)
    reader, writer = await asyncio.open_unix_connection(sock=channel, limit=MAX_LINE)
    return BenchWorker(company, proc, reader, writer, spawned)


async def spawn_many(launcher: Launch, engine: str, root: Path, n: int, proxy: str | None,
                     prefix: str) -> list[BenchWorker]:
    """n workers, at most BOOTING_AT_ONCE booting at a time (as the supervisor does)."""
    slots = asyncio.Semaphore(BOOTING_AT_ONCE)
    ids = [f"{prefix}-{i:03d}" for i in range(n)]
    if engine == "simulator":
        write_simulator_sessions(root, ids)

    async def one(cid: str) -> BenchWorker:
        session = root / "sessions" / f"session-{cid}"
        session.mkdir(mode=0o700, parents=True, exist_ok=True)
        async with slots:
            worker = await spawn(launcher, engine, cid, session, proxy)
            await worker.until(lambda w: w.hello is not None, 120, "hello")
        return worker

    return list(await asyncio.gather(*(one(cid) for cid in ids)))


def pss_mib(pids: Iterable[int]) -> float:
    return sum(smaps_rollup(pid)["Pss"] for pid in pids) / MiB


KSM = Path("/sys/kernel/mm/ksm")


def ksm_state() -> dict[str, Any]:
    """Whether the host runs kernel same-page merging (the workers ask for it; the host decides)."""
    try:
        return {"run": int((KSM / "run").read_text()), "pages_to_scan": int((KSM / "pages_to_scan").read_text()),
                "sleep_millisecs": int((KSM / "sleep_millisecs").read_text())}
    except (OSError, ValueError):
        return {"run": 0}


async def ksm_settle(scans: int, timeout: float = 900.0) -> int:
    """Where KSM runs: wait for `scans` more full scans, so that what can merge has merged."""
    if not scans or ksm_state()["run"] != 1:
        return 0
    start = int((KSM / "full_scans").read_text())
    deadline = time.monotonic() + timeout
    while int((KSM / "full_scans").read_text()) < start + scans:
        if time.monotonic() > deadline:
            raise RuntimeError(f"KSM did not finish {scans} full scans within {timeout:g}s")
        await asyncio.sleep(0.5)
    return scans


# ------------------------------------------------------------------------------ phases 1, 2, 4


async def memory_run(engine: str, launcher_name: str, n: int, messages: int, root: Path, settle: float,
                     zygote_args: tuple[str, ...] = (), full_collection: bool = False,
                     ksm_scans: int = 2) -> dict[str, Any]:
    """n workers of one engine through one launcher: marginal PSS per company, before and after
    each handled `messages` incoming messages."""
    launcher = make_launch(launcher_name, zygote_args)
    root.mkdir(parents=True, exist_ok=True)
    workers: list[BenchWorker] = []
    result: dict[str, Any] = {"engine": engine, "launcher": launcher_name, "companies": n,
                              "zygote_args": list(zygote_args)}
    proxy_cm = Socks5FaultProxy(mode="silent") if engine == "neonize" else None
    proxy = proxy_cm.__enter__() if proxy_cm is not None else None
    try:
        url = proxy.url if proxy is not None else None
        if url is not None and not url.startswith("socks5://127.0.0.1:"):
            raise RuntimeError(f"refusing to run neonize without a loopback proxy (got {url})")
        zygote: int | None = None
        base = 0.0
        if isinstance(launcher, ZygoteLauncher):
            zygote = await launcher.start_zygote(engine)
            if zygote is None:
                raise RuntimeError("the zygote did not start")
            await asyncio.sleep(0.5)
            await ksm_settle(ksm_scans)  # the zygote's own identical pages merge too: not the workers' saving
            base = pss_mib([zygote])
            result["zygote_alone_pss_mib"] = round(base, 2)
        workers = await spawn_many(launcher, engine, root, n, url, f"{engine[:3]}-{launcher_name}")
        if proxy is not None:
            if not await asyncio.to_thread(proxy.wait_for_connections, n, 120):
                raise RuntimeError(f"only {proxy.connections} of {n} clients dialed the proxy")
        else:
            for w in workers:
                await w.until(lambda w: "connected" in w.states, 60, "connected")
        await asyncio.sleep(settle)
        result["ksm_full_scans_waited"] = await ksm_settle(ksm_scans)
        pids = [w.proc.pid for w in workers]
        everything = [*([zygote] if zygote else []), *pids]

        def figures(label: str) -> None:
            total = pss_mib(everything)
            result[f"{label}_total_pss_mib"] = round(total, 1)
            result[f"{label}_marginal_pss_mib"] = round((total - base) / n, 2)
            result[f"{label}_worker_private_mib"] = round(
                statistics.median(smaps_rollup(p)["Private"] for p in pids) / MiB, 2)
            if zygote:
                result[f"{label}_zygote_pss_mib"] = round(pss_mib([zygote]), 2)

        figures("idle")
        say(f"    {engine} {launcher_name} N={n}: idle marginal {result['idle_marginal_pss_mib']} MiB/company")
        if messages:
            t0 = time.monotonic()
            if engine == "neonize":
                await asyncio.gather(*(w.command("replay", {"count": messages}) for w in workers))
            else:
                await asyncio.gather(*(w.command("simulate", {"action": "burst", "count": messages})
                                       for w in workers))
            for w in workers:
                await w.until(lambda w: w.events >= messages, 120, f"{messages} events")
            result["messages_seconds"] = round(time.monotonic() - t0, 2)
            result["events_received"] = sum(w.events for w in workers)
            await asyncio.sleep(settle)
            await ksm_settle(ksm_scans)
            figures("after_messages")
            result["drift_mib"] = round(result["after_messages_marginal_pss_mib"] - result["idle_marginal_pss_mib"], 2)
            say(f"    ... after {messages} messages each: {result['after_messages_marginal_pss_mib']} MiB/company")
            if full_collection and engine == "neonize":
                await asyncio.gather(*(w.command("replay", {"count": 1, "collect": True}) for w in workers))
                await asyncio.sleep(settle)
                figures("after_full_collection")
        result["hello_s"] = summary_s([w.hello - w.spawned for w in workers if w.hello])
    finally:
        codes = await asyncio.gather(*(w.stop() for w in workers), return_exceptions=True)
        result["exit_codes"] = sorted({c if isinstance(c, int) else repr(c) for c in codes})
        await close_launch(launcher)
        if proxy_cm is not None:
            proxy_cm.__exit__(None, None, None)
        shutil.rmtree(root, ignore_errors=True)
    return result


def summary_s(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    return {"median_ms": round(statistics.median(values) * 1000, 1), "min_ms": round(min(values) * 1000, 1),
            "max_ms": round(max(values) * 1000, 1), "n": len(values)}


# ------------------------------------------------------------------------------ phase 3


async def latency(engine: str, runs: int, root: Path) -> dict[str, Any]:
    """spawn -> hello, one worker at a time, for both launchers; and a zygote's boot."""
    out: dict[str, Any] = {}
    proxy_cm = Socks5FaultProxy(mode="silent") if engine == "neonize" else None
    proxy = proxy_cm.__enter__() if proxy_cm is not None else None
    try:
        for name in ("exec", "zygote"):
            launcher = make_launch(name)
            if isinstance(launcher, ZygoteLauncher):
                t0 = time.monotonic()
                await launcher.start_zygote(engine)
                out["zygote_boot_ms"] = round((time.monotonic() - t0) * 1000, 1)
            times = []
            sub = root / f"{engine}-{name}"
            ids = [f"lat-{i:03d}" for i in range(runs)]
            if engine == "simulator":
                write_simulator_sessions(sub, ids)
            try:
                for cid in ids:
                    session = sub / "sessions" / f"session-{cid}"
                    session.mkdir(mode=0o700, parents=True, exist_ok=True)
                    w = await spawn(launcher, engine, cid, session, proxy.url if proxy else None)
                    await w.until(lambda w: w.hello is not None, 120, "hello")
                    assert w.hello is not None
                    times.append(w.hello - w.spawned)
                    await w.stop()
            finally:
                await close_launch(launcher)
            out[name] = summary_s(times)
            say(f"    {engine} {name}: spawn -> hello median {out[name]['median_ms']} ms")
    finally:
        if proxy_cm is not None:
            proxy_cm.__exit__(None, None, None)
        shutil.rmtree(root, ignore_errors=True)
    return out


# ------------------------------------------------------------------------------ phase 5


def children_of(pid: int) -> list[int]:
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                text = (entry / "stat").read_text()
            except OSError:
                continue
            if int(text.rpartition(")")[2].split()[1]) == pid:
                out.append(int(entry.name))
    return out


def fd_count(pid: int, kinds: tuple[str, ...] = ("socket:", "pipe:", "anon_inode:[pidfd]")) -> int:
    base = Path(f"/proc/{pid}/fd")
    return sum(1 for fd in base.iterdir() if os.readlink(fd).startswith(kinds))


def stress(root: Path, cycles: int, companies: int, launcher: str) -> dict[str, Any]:
    """cycles connect/stop cycles over `companies` neonize companies through a real daemon."""
    with Socks5FaultProxy(mode="silent") as proxy:
        if not proxy.url.startswith("socks5://127.0.0.1:"):
            raise RuntimeError(f"refusing to run neonize without a loopback proxy (got {proxy.url})")
        ids = [f"stress-{i:02d}" for i in range(companies)]
        config = "\n".join([
            "[logging]", 'level = "info"', 'format = "json"',
            "[reconnect]", "connect_rate = 1000", 'connect_timeout = "600s"',
            "[workers]", f'launcher = "{launcher}"', 'stop_grace = "10s"',
            *[line for cid in ids for line in ("[[companies]]", f'id = "{cid}"', 'engine = "neonize"',
                                                f'proxy = "{proxy.url}"')],
        ]) + "\n"
        daemon = DaemonProcess(root, config=config)
        daemon.start()
        client = daemon.client
        try:
            per_company = cycles // companies
            errors: list[str] = []
            done = [0]
            lock = threading.Lock()
            # one warm-up cycle each, so the zygote and the daemon's own pools exist before counting fds
            for cid in ids:
                client.post(f"/v1/companies/{cid}/connect")
            wait_until(lambda: all(client.get(f"/v1/companies/{c}").json()["state"] == "connecting" for c in ids), 120)
            for cid in ids:
                client.request("DELETE", f"/v1/companies/{cid}")
            time.sleep(1.0)
            zygotes = [p for p in children_of(daemon.pid)]
            before = {"daemon_fds": fd_count(daemon.pid), "children": sorted(zygotes),
                      "zygote_fds": {p: len(os.listdir(f"/proc/{p}/fd")) for p in zygotes}}
            dials_before = proxy.connections

            def company_loop(cid: str) -> None:
                rng = random.Random(cid)
                c = daemon.client
                for _ in range(per_company):
                    try:
                        if not c.post(f"/v1/companies/{cid}/connect").ok:
                            raise RuntimeError("connect refused")
                        wait_until(lambda: c.get(f"/v1/companies/{cid}").json()["state"] == "connecting", 60,
                                   interval=0.05)
                        time.sleep(rng.uniform(0, 0.3))  # stop during Go's start or its dial
                        response = c.request("DELETE", f"/v1/companies/{cid}")
                        if response.status != 200 or response.json()["state"] != "stopped":
                            raise RuntimeError(f"stop: {response.status} {response.body[:200]!r}")
                        with lock:
                            done[0] += 1
                    except Exception as exc:  # noqa: BLE001
                        with lock:
                            errors.append(f"{cid}: {exc}")
                        return

            say(f"    warmed up; {per_company * companies} cycles now")
            t0 = time.monotonic()
            threads = [threading.Thread(target=company_loop, args=(cid,)) for cid in ids]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            seconds = time.monotonic() - t0
            time.sleep(1.0)
            after = {"daemon_fds": fd_count(daemon.pid), "children": sorted(children_of(daemon.pid)),
                     "zygote_fds": {p: len(os.listdir(f"/proc/{p}/fd")) for p in children_of(daemon.pid)}}
            exits = [e for e in daemon_log_events(daemon) if e.get("event") == "worker exited"]
            crashes = [e for e in exits if e.get("exit_code") != 0 or e.get("killed")]
            result = {
                "launcher": launcher, "companies": companies, "cycles_done": done[0], "seconds": round(seconds, 1),
                "errors": errors[:10], "worker_exits": len(exits), "crashes": len(crashes),
                "crash_samples": crashes[:5], "dials": proxy.connections - dials_before,
                "before": before, "after": after,
                "zygote_restarts": sum(1 for e in daemon_log_events(daemon) if e.get("event") == "zygote exited; "
                                       "its workers run on, new ones are exec'd until it is back"),
            }
        finally:
            code = daemon.stop(timeout=60)
        time.sleep(0.5)
        result["exit_code"] = code
        result["left_after_stop"] = [p for p in result["after"]["children"] if Path(f"/proc/{p}").exists()]
        return result


def daemon_log_events(daemon: DaemonProcess) -> list[dict[str, Any]]:
    return daemon.log_events()


# ------------------------------------------------------------------------------ report


def report(m: dict[str, Any], r: dict[str, Any]) -> None:
    rows: list[tuple[str, str, str]] = []
    for run in r.get("memory", []):
        label = f"{run['engine']} {run['launcher']}, N = {run['companies']}"
        target = ("<= 10 MiB (zygote)" if run["engine"] == "neonize" else "<= 6 MiB (zygote)") \
            if run["launcher"] == "zygote" else "-"
        rows.append((f"{label}: marginal PSS per company, idle", f"{run['idle_marginal_pss_mib']:.1f} MiB", target))
        if "after_messages_marginal_pss_mib" in run:
            rows.append((f"{label}: ... after {r['messages']} messages each",
                         f"{run['after_messages_marginal_pss_mib']:.1f} MiB (drift {run['drift_mib']:+.1f})", target))
        rows.append((f"{label}: total PSS (zygote alone)",
                     f"{run['idle_total_pss_mib']:.0f} MiB"
                     + (f" ({run['zygote_alone_pss_mib']:.0f} MiB)" if "zygote_alone_pss_mib" in run else ""), "-"))
    for engine, lat in r.get("latency", {}).items():
        for name in ("exec", "zygote"):
            if lat.get(name):
                rows.append((f"{engine}: spawn -> hello, {name} (median; min-max)",
                             f"{lat[name]['median_ms']:.0f} ms ({lat[name]['min_ms']:.0f}-{lat[name]['max_ms']:.0f})", "-"))
        rows.append((f"{engine}: zygote boot", f"{lat.get('zygote_boot_ms', 0):.0f} ms", "-"))
    for step in r.get("steps", []):
        rows.append((f"step: {step['step']}", f"{step['idle_marginal_pss_mib']:.1f} MiB idle, "
                     f"{step.get('after_messages_marginal_pss_mib', float('nan')):.1f} after messages, "
                     f"{step.get('after_full_collection_marginal_pss_mib', float('nan')):.1f} after a full "
                     f"collection; zygote {step.get('zygote_alone_pss_mib', 0):.0f} MiB", "-"))
    s = r.get("stress")
    if s:
        rows.append((f"stress: {s['cycles_done']} connect/stop cycles over {s['companies']} neonize companies",
                     f"{s['seconds']:.0f} s, {s['dials']} dials, {s['crashes']} crashes, {len(s['errors'])} errors",
                     "0 crashes"))
        rows.append(("stress: daemon fds (sockets, pipes, pidfds) before -> after",
                     f"{s['before']['daemon_fds']} -> {s['after']['daemon_fds']}", "no growth"))
        rows.append(("stress: daemon's children before -> after (zygote)",
                     f"{len(s['before']['children'])} -> {len(s['after']['children'])}; after stop: "
                     f"{len(s['left_after_stop'])} left", "no growth; 0"))
    print(f"machine: {m['nproc']} CPUs ({m['cpu_model']}), {m['memory_gib']} GiB, Linux {m['kernel']}, "
          f"Python {m['python']}, neonize {m['neonize']}; load {' '.join(m['loadavg_start'])} -> "
          f"{' '.join(m.get('loadavg_end', []))}; KSM {m['ksm']}")
    print_rows(rows)


def isolate_or_not(argv: list[str]) -> int | None:
    """Re-run in a fresh loopback-only network namespace when root; None to go on here."""
    if os.environ.get("WBENCH_ISOLATED") or os.geteuid() != 0 or not shutil.which("unshare"):
        if not os.environ.get("WBENCH_ISOLATED"):
            say("(not root or no unshare: this network namespace; clients only ever dial 127.0.0.1)")
        return None
    if subprocess.run(["unshare", "--net", "true"], capture_output=True).returncode != 0:
        return None
    env = {**os.environ, "WBENCH_ISOLATED": "1"}
    script = "ip link set lo up 2>/dev/null; exec \"$@\""
    return subprocess.run(["unshare", "--net", "--", "sh", "-c", script, "sh", sys.executable, *argv],
                          env=env).returncode


async def run_all(args: argparse.Namespace, base: Path) -> dict[str, Any]:
    r: dict[str, Any] = {"messages": args.messages, "memory": [], "steps": []}
    sizes = [int(x) for x in args.sizes.split(",") if x]
    phases = set(args.phases.split(","))
    if "memory" in phases:
        for engine in args.engines.split(","):
            for n in sizes:
                for name in args.launchers.split(","):
                    say(f"[memory] {engine}, {name}, N = {n}")
                    r["memory"].append(await memory_run(engine, name, n, args.messages,
                                                        base / f"mem-{engine}-{name}-{n}", args.settle,
                                                        ksm_scans=args.ksm_scans))
    if "latency" in phases:
        r["latency"] = {}
        for engine in ("neonize", "simulator"):
            say(f"[latency] {engine}")
            r["latency"][engine] = await latency(engine, args.latency_runs, base / f"lat-{engine}")
    if "steps" in phases:
        steps = [
            ("exec (no zygote)", "exec", ()),
            ("zygote: neonize's Python side only (the prototype): gc.freeze, signatures at once", "zygote",
             ("--bench-no-worker-code", "--bench-gc", "freeze", "--bench-eager-signatures")),
            ("+ whatsappd's worker code preloaded", "zygote", ("--bench-gc", "freeze", "--bench-eager-signatures")),
            ("+ Go function signatures set on first use", "zygote", ("--bench-gc", "freeze")),
            ("+ import-time garbage collected before freezing (the default)", "zygote", ()),
            ("instead: collector off while importing, garbage frozen", "zygote", ("--bench-gc", "disable-freeze")),
            ("instead: nothing frozen", "zygote", ("--bench-gc", "none")),
        ]
        for label, name, zargs in steps:
            say(f"[steps] {label}")
            run = await memory_run("neonize", name, args.steps_size, args.messages, base / "steps", args.settle, zargs,
                                   full_collection=True)
            run["step"] = label
            r["steps"].append(run)
    return r


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="10,50", help="companies per memory run (default 10,50)")
    p.add_argument("--messages", type=int, default=1000, help="incoming messages per worker (default 1000)")
    p.add_argument("--settle", type=float, default=5.0, help="seconds before each measurement (default 5)")
    p.add_argument("--latency-runs", type=int, default=20)
    p.add_argument("--steps-size", type=int, default=10)
    p.add_argument("--cycles", type=int, default=1000, help="stress: connect/stop cycles (default 1000)")
    p.add_argument("--stress-companies", type=int, default=20)
    p.add_argument("--stress-launcher", default="zygote", choices=("zygote", "exec"))
    p.add_argument("--phases", default="memory,latency,steps,stress")
    p.add_argument("--engines", default="neonize,simulator", help="memory phase: engines (default both)")
    p.add_argument("--launchers", default="exec,zygote", help="memory phase: launchers (default both)")
    p.add_argument("--ksm-scans", type=int, default=2,
                   help="memory phase, where the host runs KSM: full scans to wait for before measuring (default 2)")
    p.add_argument("--json", type=Path, help="also write every figure (raw) to this file")
    p.add_argument("--keep", action="store_true", help="keep the temporary directory (workers' logs)")
    args = p.parse_args()
    isolated = isolate_or_not(sys.argv)
    if isolated is not None:
        return isolated
    os.environ[REPLAY_ENV] = "1"  # every worker may replay; the zygote preloads the replay they run
    os.environ["WHATSAPPD_SIM_CONNECT_DELAY"] = "0.05"
    m = machine()
    m["ksm"] = ksm_state()
    base = Path(tempfile.mkdtemp(prefix="wbench-zygote-"))
    os.chmod(base, 0o700)
    # Workers and zygotes write their logs to stderr, which they inherit: a file, not the terminal.
    log_path = base / "workers.log"
    bench_stderr = os.dup(2)
    sys.stderr = os.fdopen(bench_stderr, "w", buffering=1)
    log_fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    os.dup2(log_fd, 2)
    os.close(log_fd)
    configure_logging("json", LOG_LEVEL, stream=open(os.devnull, "w"))  # noqa: SIM115
    t0 = time.monotonic()
    try:
        results = asyncio.run(run_all(args, base))
        if "stress" in args.phases.split(","):
            say(f"[stress] {args.cycles} connect/stop cycles over {args.stress_companies} neonize companies")
            results["stress"] = stress(base / "stress", args.cycles, args.stress_companies, args.stress_launcher)
    finally:
        if args.keep:
            say(f"kept {base} (workers' logs: {log_path})")
        else:
            shutil.rmtree(base, ignore_errors=True)
    m["loadavg_end"] = Path("/proc/loadavg").read_text().split()[:3]
    results["machine"] = m
    results["bench_seconds"] = round(time.monotonic() - t0)
    results["network_namespace"] = "fresh, loopback only" if os.environ.get("WBENCH_ISOLATED") else "host"
    report(m, results)
    print(f"\nbench took {results['bench_seconds']} s; network namespace: {results['network_namespace']}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
