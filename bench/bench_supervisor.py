#!/usr/bin/env python3
"""Issue 3 benchmark: company supervision. Prints figures; asserts nothing about timings.

    .venv/bin/python bench/bench_supervisor.py [--companies 100] [--json results.json]

What it measures (each against the target from issue 3), with real `whatsappd run` daemons,
a real NOTIFY_SOCKET and real worker processes:

 1. exec of `whatsappd run` -> READY=1, with 1 and with N companies that all hold a stored
    session (so all of them are restored at start);
 2. exec -> every company `connected`, at the default reconnect.connect_rate (2/s) and at 1000/s;
 3. the daemon's RSS with N simulator workers running, and its CPU over 30 idle seconds;
 4. a worker's private memory (Private_Clean + Private_Dirty from smaps_rollup; RSS and PSS
    too) on the simulator engine (N running) and on the neonize engine (5 running);
 5. kill -9 of a connected simulator worker -> the company `connected` again with a new pid,
    minus the backoff delay the supervisor drew (reconnect.initial_delay = 10ms).

The neonize workers never reach the network: every neonize company is configured with
`proxy = "socks5://127.0.0.1:PORT"`, a local SOCKS5 listener in `silent` mode (accepts, never
answers), and when the bench runs as root that phase runs in a fresh network namespace whose
only interface is loopback (`unshare --net`), so nothing can leave the machine even by mistake.

Stored simulator sessions are written directly as `simulator.json` (the simulator's store
format), dir 0700 and file 0600, and checked with the simulator's own `has_session()`.

Every process it starts is ended by pid: daemons with SIGTERM; workers must then be gone (any
left over is reported and killed by pid).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from whatsappd.client import Client  # noqa: E402
from whatsappd.testing.daemon import DaemonProcess, NotifySocket, clean_env  # noqa: E402
from whatsappd.worker.simulator import server as simulator  # noqa: E402

CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")
MiB = 1024 * 1024

#: every daemon started by this process, so that `finally` can end them all (by pid)
_DAEMONS: list[DaemonProcess] = []


def say(*parts: Any) -> None:
    print(*parts, file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------ /proc readers


def proc_cpu_seconds(pid: int) -> float:
    """utime + stime of a process (all its threads), in seconds."""
    text = Path(f"/proc/{pid}/stat").read_text()
    fields = text[text.rindex(")") + 2:].split()
    # fields[0] is field 3 (state); utime and stime are fields 14 and 15
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def proc_status_kib(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


def smaps_rollup(pid: int) -> dict[str, int]:
    """Rss, Pss, Private (= Private_Clean + Private_Dirty), ... in KiB."""
    out: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
        name, _, rest = line.partition(":")
        parts = rest.split()
        if parts and parts[-1] == "kB":
            out[name.strip()] = int(parts[0])
    out["Private"] = out.get("Private_Clean", 0) + out.get("Private_Dirty", 0)
    return out


def worker_pids_under(root: Path) -> list[int]:
    """Live workers and zygotes (ours, by construction) holding a file under root: a worker its
    session lock, a zygote or a worker forked by one the daemon's log (their cmdline is the
    zygote's, without the session dir)."""
    pids = []
    prefix = str(root)
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
            if b"whatsappd.worker" not in cmdline:  # a worker, a zygote (whatsappd.worker.zygote) or its fork
                continue
            if any(os.readlink(fd).startswith(prefix) for fd in (entry / "fd").iterdir()):
                pids.append(int(entry.name))
        except OSError:
            continue
    return pids


# ------------------------------------------------------------------------------ machine


def machine() -> dict[str, Any]:
    model = "unknown"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
            break
    mem_kib = proc_meminfo("MemTotal")
    try:
        import importlib.metadata as md
        neonize_version = md.version("neonize")
    except Exception:  # noqa: BLE001
        neonize_version = "not installed"
    return {
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "nproc": len(os.sched_getaffinity(0)),
        "cpu_model": model,
        "memory_gib": round(mem_kib / 1024 / 1024, 1),
        "python": platform.python_version(),
        "kernel": platform.release(),
        "neonize": neonize_version,
        "loadavg_start": Path("/proc/loadavg").read_text().split()[:3],
    }


def proc_meminfo(key: str) -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return 0


# ------------------------------------------------------------------------------ setup helpers


def company_ids(n: int, prefix: str = "sim") -> list[str]:
    return [f"{prefix}-{i:03d}" for i in range(n)]


def write_simulator_sessions(state_dir: Path, ids: list[str]) -> None:
    """A paired simulator store per company: sessions/session-{id}/simulator.json (0700/0600)."""
    sessions = state_dir / "sessions"
    state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    sessions.mkdir(mode=0o700, exist_ok=True)
    now = dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    for n, cid in enumerate(ids):
        d = sessions / f"session-{cid}"
        d.mkdir(mode=0o700, exist_ok=True)
        os.chmod(d, 0o700)
        body = {"format": "whatsappd-simulator", "version": 1,
                "device": {"jid": f"55119{n:08d}@s.whatsapp.net", "push_name": f"Bench {cid}",
                           "paired_at": now}}
        path = d / simulator.SESSION_FILE
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(body, f, indent=2)
            f.write("\n")
        os.chmod(path, 0o600)
        if not simulator.has_session(d):
            raise RuntimeError(f"the simulator does not accept the store written in {d}; "
                               "its format changed: update write_simulator_sessions()")


def config_text(companies: list[tuple[str, str, str | None]], *, rate: float,
                connect_timeout: str = "600s", initial_delay: str = "10ms") -> str:
    lines = [
        "[logging]", 'format = "json"', 'level = "info"',
        "[reconnect]", f"connect_rate = {rate:g}", f'initial_delay = "{initial_delay}"',
        f'connect_timeout = "{connect_timeout}"',
    ]
    for cid, engine, proxy in companies:
        lines += ["[[companies]]", f'id = "{cid}"', f'engine = "{engine}"']
        if proxy is not None:
            lines.append(f'proxy = "{proxy}"')
    return "\n".join(lines) + "\n"


class Run:
    """One daemon under a root dir, started with a fresh notify socket.

    The notify socket is drained continuously from a thread once READY=1 arrived, as systemd
    does: the daemon's sd_notify send is blocking, and an AF_UNIX datagram socket queues only
    net.unix.max_dgram_qlen (10) messages, so an undrained socket stalls the daemon's event
    loop (see bench/RESULTS.md).
    """

    def __init__(self, root: Path, config: str) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        notify_path = root / "notify.sock"
        notify_path.unlink(missing_ok=True)
        self.notify = NotifySocket(notify_path)
        self.daemon = DaemonProcess(root, config=config, notify=self.notify)
        self.t_exec = 0.0
        self.ready_s = float("nan")
        self.slowest_health_s = 0.0
        self._draining = threading.Event()
        self._drainer: threading.Thread | None = None

    def start(self) -> Run:
        self.t_exec = time.monotonic()
        self.daemon.start(wait=False)
        _DAEMONS.append(self.daemon)
        try:
            i = self.notify.wait_for("READY", "1", timeout=30)
        except TimeoutError:
            raise RuntimeError(f"no READY=1 within 30 s; daemon log:\n{self.daemon.logs()[-4000:]}") from None
        self.ready_s = self.notify.received[i][0] - self.t_exec
        self._draining.set()
        self._drainer = threading.Thread(target=self._drain, name="notify-drain", daemon=True)
        self._drainer.start()
        return self

    def _drain(self) -> None:
        while self._draining.is_set():
            self.notify.collect(0.2)

    def notifications(self, key: str) -> int:
        return sum(1 for _, fields in list(self.notify.received) if key in fields)

    @property
    def client(self) -> Client:
        return Client(str(self.daemon.socket_path), timeout=30)

    def companies(self) -> list[dict[str, Any]]:
        resp = self.client.get("/v1/companies")
        data = resp.json()
        return data["companies"] if isinstance(data, dict) else data

    def company(self, cid: str) -> dict[str, Any]:
        return self.client.get(f"/v1/companies/{cid}").json()

    def by_state(self) -> dict[str, int]:
        return self.client.get("/v1/health").json()["companies"]["by_state"]

    def stop(self) -> dict[str, float]:
        """SIGTERM the daemon; return how long it took and check that no worker is left."""
        t0 = time.monotonic()
        try:
            code = self.daemon.stop(timeout=60)
        finally:
            self._draining.clear()
            if self._drainer is not None:
                self._drainer.join(2)
            self.notify.close()
        took = time.monotonic() - t0
        leftovers = wait_workers_gone(self.root)
        if code != 0:
            say(f"  ! daemon exited with {code}")
        return {"stop_s": took, "exit_code": code, "leftover_workers": leftovers}


def wait_workers_gone(root: Path, timeout: float = 10.0) -> int:
    """Workers die with their daemon (PDEATHSIG, channel EOF). Report and kill any that do not."""
    deadline = time.monotonic() + timeout
    while (left := worker_pids_under(root)) and time.monotonic() < deadline:
        time.sleep(0.05)
    for pid in left:
        say(f"  ! worker {pid} outlived its daemon; killing it")
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return len(left)


def summary(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


# ------------------------------------------------------------------------------ phases


def bench_ready(base: Path, n_companies: int, runs: int) -> dict[str, Any]:
    """exec -> READY=1 with 1 and with n companies, all holding a stored session.

    Runs are interleaved (1, n, floor, 1, n, floor, ...) so that load from other processes on
    the machine hits every series alike.
    """
    sizes = sorted({1, n_companies})
    roots: dict[int, tuple[Path, str]] = {}
    for n in sizes:
        root = base / f"ready-{n}"
        ids = company_ids(n)
        write_simulator_sessions(root / "state", ids)
        roots[n] = (root, config_text([(c, "simulator", None) for c in ids], rate=2))
    times: dict[int, list[float]] = {n: [] for n in sizes}
    stops: dict[int, list[dict[str, float]]] = {n: [] for n in sizes}
    floor: list[float] = []
    for _ in range(runs):
        for n in sizes:
            run = Run(*roots[n]).start()
            times[n].append(run.ready_s)
            # READY comes before any worker is spawned; let the first starts happen, then stop.
            time.sleep(0.5)
            stops[n].append(run.stop())
        # The floor under it: an interpreter that only imports the daemon's modules.
        t0 = time.monotonic()
        subprocess.run([sys.executable, "-c", "import whatsappd.cli, whatsappd.daemon"], check=True,
                       env=clean_env(), cwd=str(base))
        floor.append(time.monotonic() - t0)
    out: dict[str, Any] = {}
    for n in sizes:
        out[str(n)] = {"ready_s": summary(times[n]), "stops": stops[n]}
        say(f"  READY with {n} compan{'y' if n == 1 else 'ies'}: median {statistics.median(times[n]) * 1000:.0f} ms "
            f"(runs: {', '.join(f'{t * 1000:.0f}' for t in times[n])} ms)")
    out["import_floor_s"] = summary(floor)
    say(f"  python + imports only: median {statistics.median(floor) * 1000:.0f} ms "
        f"(runs: {', '.join(f'{t * 1000:.0f}' for t in floor)} ms)")
    return out


def wait_all_connected(run: Run, n: int, timeout: float, interval: float = 0.1) -> float:
    """Seconds from exec until /v1/health counts n connected companies.

    Also keeps the slowest /v1/health answer seen meanwhile in run.slowest_health_s.
    """
    deadline = time.monotonic() + timeout
    while True:
        t_req = time.monotonic()
        counts = run.by_state()
        now = time.monotonic()
        run.slowest_health_s = max(run.slowest_health_s, now - t_req)
        if counts.get("connected", 0) >= n:
            return now - run.t_exec
        if now > deadline:
            raise RuntimeError(f"not all {n} connected within {timeout:.0f}s: {counts}")
        time.sleep(interval)


def bench_connect_fast(base: Path, n: int, rate: float) -> dict[str, Any]:
    root = base / f"connect-rate-{rate:g}"
    ids = company_ids(n)
    write_simulator_sessions(root / "state", ids)
    run = Run(root, config_text([(c, "simulator", None) for c in ids], rate=rate)).start()
    try:
        all_s = wait_all_connected(run, n, timeout=n / rate + 120, interval=0.05)
        sup_cpu = proc_cpu_seconds(run.daemon.pid)
        restarts = sum(c["worker"]["restarts"] for c in run.companies())
        time.sleep(0.5)
        statuses = run.notifications("STATUS")
    finally:
        stop = run.stop()
    say(f"  rate {rate:g}/s: READY {run.ready_s * 1000:.0f} ms, all {n} connected after {all_s:.2f} s "
        f"({statuses} STATUS= notifications); SIGTERM->exit with {n} workers {stop['stop_s']:.2f} s")
    return {"rate": rate, "ready_s": run.ready_s, "all_connected_s": all_s, "status_notifications": statuses,
            "supervisor_cpu_s": sup_cpu, "worker_restarts": restarts,
            "slowest_health_s": run.slowest_health_s, **stop}


def bench_default_rate_and_idle(base: Path, n: int, idle_seconds: float, kills: int) -> dict[str, Any]:
    """Default connect_rate: time to all connected; then RSS, idle CPU, worker memory, kill -9."""
    root = base / "connect-rate-default"
    ids = company_ids(n)
    write_simulator_sessions(root / "state", ids)
    run = Run(root, config_text([(c, "simulator", None) for c in ids], rate=2)).start()
    result: dict[str, Any] = {"rate": 2.0, "ready_s": run.ready_s}
    try:
        result["all_connected_s"] = wait_all_connected(run, n, timeout=n / 2 + 120, interval=0.2)
        result["supervisor_cpu_s"] = proc_cpu_seconds(run.daemon.pid)
        result["worker_restarts"] = sum(c["worker"]["restarts"] for c in run.companies())
        result["slowest_health_s"] = run.slowest_health_s
        say(f"  rate 2/s: READY {run.ready_s * 1000:.0f} ms, all {n} connected after "
            f"{result['all_connected_s']:.1f} s")
        pid = run.daemon.pid
        time.sleep(2.0)  # let the last starts settle
        result["status_notifications"] = run.notifications("STATUS")

        # --- supervisor RSS and idle CPU (no API calls during the window)
        workers = [c["worker"]["pid"] for c in run.companies()]
        assert all(workers) and len(set(workers)) == n, "every company should have its own worker"
        rss_before = proc_status_kib(pid, "VmRSS")
        cpu0, w0, t0 = proc_cpu_seconds(pid), sum(proc_cpu_seconds(w) for w in workers), time.monotonic()
        say(f"  idle for {idle_seconds:g} s ...")
        time.sleep(idle_seconds)
        cpu1, w1, t1 = proc_cpu_seconds(pid), sum(proc_cpu_seconds(w) for w in workers), time.monotonic()
        result["supervisor"] = {
            "rss_kib": proc_status_kib(pid, "VmRSS"),
            "rss_kib_before_idle": rss_before,
            "hwm_kib": proc_status_kib(pid, "VmHWM"),
            "threads": proc_status_kib(pid, "Threads"),
            "idle_window_s": t1 - t0,
            "idle_cpu_pct": 100 * (cpu1 - cpu0) / (t1 - t0),
            "idle_cpu_s": cpu1 - cpu0,
            "workers_idle_cpu_pct_total": 100 * (w1 - w0) / (t1 - t0),
            "smaps": smaps_rollup(pid),
        }
        s = result["supervisor"]
        say(f"  supervisor: RSS {s['rss_kib'] / 1024:.1f} MiB (peak {s['hwm_kib'] / 1024:.1f}), "
            f"idle CPU {s['idle_cpu_pct']:.2f}% of a core; {n} workers together "
            f"{s['workers_idle_cpu_pct_total']:.2f}%")

        # --- simulator worker memory (and CPU so far: almost all of it is the start), every worker
        result["simulator_worker_cpu_s"] = summary([proc_cpu_seconds(w) for w in workers])
        mems = [smaps_rollup(w) for w in workers]
        result["simulator_worker"] = {k: summary([m[k] / 1024 for m in mems]) for k in ("Private", "Pss", "Rss")}
        sw = result["simulator_worker"]
        say(f"  simulator worker: Private {sw['Private']['median']:.1f} MiB, "
            f"PSS {sw['Pss']['median']:.1f}, RSS {sw['Rss']['median']:.1f} (median of {n})")

        # --- kill -9 one connected worker at a time; time until connected with a new pid
        result["replace"] = bench_kills(run, ids[:kills])
    finally:
        result.update(run.stop())
    say(f"  SIGTERM->exit with {n} workers: {result['stop_s']:.2f} s, leftover workers: "
        f"{result['leftover_workers']}")
    return result


def bench_kills(run: Run, ids: list[str]) -> dict[str, Any]:
    raw, backoff, net = [], [], []
    for cid in ids:
        time.sleep(1.0)  # the connect-rate bucket (2/s, burst 1) is full again
        before = run.company(cid)
        old = before["worker"]["pid"]
        assert before["state"] == "connected" and old
        t0 = time.monotonic()
        os.kill(old, signal.SIGKILL)
        while True:
            snap = run.company(cid)
            if snap["state"] == "connected" and snap["worker"]["pid"] not in (None, old):
                break
            if time.monotonic() - t0 > 30:
                raise RuntimeError(f"{cid} not back within 30 s after kill -9: {snap}")
            time.sleep(0.005)
        took = time.monotonic() - t0
        drawn = drawn_backoff(run.daemon, cid, old)
        raw.append(took)
        backoff.append(drawn)
        net.append(took - drawn)
        say(f"  kill -9 {cid} (pid {old}): connected again in {took * 1000:.0f} ms "
            f"(backoff drawn {drawn * 1000:.1f} ms)")
    return {"raw_s": summary(raw), "backoff_s": summary(backoff), "net_s": summary(net)}


def drawn_backoff(daemon: DaemonProcess, cid: str, old_pid: int) -> float:
    """The retry delay the supervisor logged for this company's last `reconnecting` transition."""
    drawn = None
    for _ in range(50):
        for ev in daemon.log_events():
            if (ev.get("event") == "state changed" and ev.get("company") == cid
                    and ev.get("new") == "reconnecting" and "retry_in_seconds" in ev):
                drawn = float(ev["retry_in_seconds"])
        if drawn is not None:
            return drawn
        time.sleep(0.05)
    raise RuntimeError(f"no 'reconnecting' log line with retry_in_seconds for {cid}")


# ------------------------------------------------------------------------------ neonize phase


def bench_neonize(base: Path, n: int, settle: float) -> dict[str, Any]:
    """Run the neonize phase in a fresh loopback-only network namespace when we can."""
    root = base / "neonize"
    root.mkdir(parents=True, exist_ok=True)
    out_file = root / "result.json"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--phase", "neonize", "--root", str(root),
           "--neonize-companies", str(n), "--neonize-settle", str(settle), "--json", str(out_file)]
    isolated = False
    if os.geteuid() == 0 and shutil.which("unshare") and shutil.which("ip"):
        probe = subprocess.run(["unshare", "--net", "true"], capture_output=True)
        if probe.returncode == 0:
            cmd = ["unshare", "--net", "--", *cmd]
            isolated = True
    if not isolated:
        say("  (not root or no unshare: neonize phase runs in this network namespace; the client "
            "still only ever dials the SOCKS5 listener on 127.0.0.1)")
    proc = subprocess.Popen(cmd, env=clean_env(), stdin=subprocess.DEVNULL)
    try:
        code = proc.wait(timeout=180)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        raise RuntimeError("the neonize phase did not finish within 180 s") from None
    if code != 0:
        raise RuntimeError(f"the neonize phase failed (exit {code})")
    result = json.loads(out_file.read_text())
    result["network_namespace"] = "fresh, loopback only" if isolated else "host (proxy on 127.0.0.1)"
    return result


def neonize_phase(root: Path, n: int, settle: float) -> dict[str, Any]:
    """Inside the (isolated) namespace: n neonize companies dialing a silent SOCKS5 sink."""
    from whatsappd.testing.socks5 import Socks5FaultProxy

    if subprocess.run(["ip", "link", "set", "lo", "up"], capture_output=True).returncode != 0:
        say("  (could not bring lo up; continuing, it is probably up already)")
    ids = company_ids(n, "neo")
    with Socks5FaultProxy(mode="silent") as proxy:
        url = proxy.url
        if not url.startswith("socks5://127.0.0.1:"):
            raise RuntimeError(f"refusing to run neonize without a loopback proxy (got {url})")
        companies = [(c, "neonize", url) for c in ids]
        assert all(p and p.startswith("socks5://127.0.0.1:") for _, _, p in companies)
        # connect_timeout high: the silent peer must not get the workers killed while measuring
        run = Run(root, config_text(companies, rate=1000, connect_timeout="600s")).start()
        try:
            for cid in ids:  # no session: connect starts pairing, i.e. the client dials at once
                resp = run.client.post(f"/v1/companies/{cid}/connect")
                if not resp.ok:
                    raise RuntimeError(f"connect {cid}: HTTP {resp.status} {resp.body[:300]!r}")
            if not proxy.wait_for_connections(n, timeout=60):
                raise RuntimeError(f"only {proxy.connections} of {n} neonize clients reached the "
                                   f"proxy within 60 s; log:\n{run.daemon.logs()[-4000:]}")
            t_dialed = time.monotonic()
            time.sleep(settle)
            snaps = [run.company(c) for c in ids]
            pids = [s["worker"]["pid"] for s in snaps]
            if not all(pids):
                raise RuntimeError(f"a neonize worker is gone: {[(s['id'], s['state']) for s in snaps]}")
            mems = [smaps_rollup(p) for p in pids]
            result = {
                "companies": n,
                "seconds_after_dial": round(time.monotonic() - t_dialed, 1),
                "states": sorted({s["state"] for s in snaps}),
                "proxy_connections": proxy.connections,
                "proxy_requests": [list(r) for r in proxy.requests],
                "per_worker_kib": mems,
                **{k: summary([m[k] / 1024 for m in mems]) for k in ("Private", "Pss", "Rss")},
            }
        finally:
            result_stop = run.stop()
    result.update(result_stop)
    return result


# ------------------------------------------------------------------------------ report


def fmt_ms(s: float) -> str:
    return f"{s * 1000:.0f} ms"


def print_rows(rows: list[tuple[str, str, str]]) -> None:
    """The figures as aligned columns: figure, measured, target (shared by every bench)."""
    w1 = max(len(a) for a, _, _ in rows)
    w2 = max(len(b) for _, b, _ in rows)
    print(f"{'figure':<{w1}}  {'measured':<{w2}}  target")
    print(f"{'-' * w1}  {'-' * w2}  ------")
    for a, b, c in rows:
        print(f"{a:<{w1}}  {b:<{w2}}  {c}")


def print_table(m: dict[str, Any], r: dict[str, Any], n: int) -> None:
    rows: list[tuple[str, str, str]] = []
    rd = r["ready"]
    for key in sorted(k for k in rd if k.isdigit()):
        s = rd[key]["ready_s"]
        rows.append((f"exec -> READY=1, {key} compan{'y' if key == '1' else 'ies'} with sessions "
                     f"(median of {s['n']}; min-max)",
                     f"{fmt_ms(s['median'])} ({fmt_ms(s['min'])}-{fmt_ms(s['max'])})", "< 1 s"))
    rows.append(("  floor: python start + import of the daemon modules",
                 fmt_ms(rd["import_floor_s"]["median"]), "-"))
    for c in r["connect"]:
        rows.append((f"exec -> all {n} connected, connect_rate {c['rate']:g}/s",
                     f"{c['all_connected_s']:.2f} s", f"~{n / c['rate']:.1f} s by pacing" if c["rate"] < 100 else "-"))
        rows.append(("  exec -> READY=1 in that run", fmt_ms(c["ready_s"]), "< 1 s"))
        rows.append(("  STATUS= datagrams sent until all connected", str(c["status_notifications"]), "-"))
        rows.append(("  supervisor CPU from exec to all connected; worker restarts",
                     f"{c['supervisor_cpu_s']:.2f} s; {c['worker_restarts']}", "-"))
        rows.append(("  slowest GET /v1/health meanwhile", fmt_ms(c["slowest_health_s"]), "-"))
    sup = r["idle"]["supervisor"]
    rows.append((f"supervisor RSS with {n} workers (VmRSS; peak VmHWM)",
                 f"{sup['rss_kib'] / 1024:.1f} MiB ({sup['hwm_kib'] / 1024:.1f})", "< 80 MB"))
    rows.append((f"supervisor CPU over {sup['idle_window_s']:.0f} idle s",
                 f"{sup['idle_cpu_pct']:.2f} % of a core", "< 1 %"))
    rows.append((f"  all {n} simulator workers together, same window",
                 f"{sup['workers_idle_cpu_pct_total']:.2f} % of a core", "-"))
    sw = r["idle"]["simulator_worker"]
    rows.append((f"simulator worker Private (median of {n}; PSS, RSS)",
                 f"{sw['Private']['median']:.1f} MiB ({sw['Pss']['median']:.1f}, {sw['Rss']['median']:.1f})", "-"))
    wc = r["idle"]["simulator_worker_cpu_s"]
    rows.append(("simulator worker CPU since its start, at idle (median; max)",
                 f"{wc['median'] * 1000:.0f} ms ({wc['max'] * 1000:.0f} ms)", "-"))
    nz = r.get("neonize")
    if nz:
        rows.append((f"neonize worker Private (median of {nz['companies']} running; min-max)",
                     f"{nz['Private']['median']:.1f} MiB ({nz['Private']['min']:.1f}-{nz['Private']['max']:.1f})",
                     "<= 45 MiB"))
        rows.append(("  neonize worker PSS, RSS (median)",
                     f"{nz['Pss']['median']:.1f} MiB, {nz['Rss']['median']:.1f} MiB", "-"))
    rp = r["idle"]["replace"]
    rows.append((f"kill -9 -> connected with a new pid, minus backoff (median of {rp['net_s']['n']}; max)",
                 f"{fmt_ms(rp['net_s']['median'])} ({fmt_ms(rp['net_s']['max'])})", "< 1 s + backoff"))
    rows.append(("  raw, backoff included (median); backoff drawn (median)",
                 f"{fmt_ms(rp['raw_s']['median'])}; {rp['backoff_s']['median'] * 1000:.1f} ms", "-"))
    rows.append((f"SIGTERM -> daemon exit with {n} workers", f"{r['idle']['stop_s']:.2f} s", "-"))
    leftovers = r["idle"]["leftover_workers"] + sum(c["leftover_workers"] for c in r["connect"]) + (
        nz["leftover_workers"] if nz else 0)
    rows.append(("workers left behind after the daemons stopped", str(leftovers), "0"))

    print()
    print(f"whatsappd supervision benchmark ({n} simulator companies)")
    print(f"date {m['date']}; {m['nproc']} CPUs: {m['cpu_model']}; {m['memory_gib']} GiB RAM; "
          f"Python {m['python']}; Linux {m['kernel']}; neonize {m['neonize']}")
    print(f"load average (1, 5, 15 min) at start {' '.join(m['loadavg_start'])}, at end "
          f"{' '.join(m.get('loadavg_end', ['?']))}")
    if nz:
        print(f"neonize phase: network namespace {nz['network_namespace']}; proxy connections "
              f"{nz['proxy_connections']}, SOCKS requests recorded {len(nz['proxy_requests'])}; "
              f"worker states {nz['states']}; measured {nz['seconds_after_dial']} s after the dials")
    print()
    print_rows(rows)


# ------------------------------------------------------------------------------ main


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--companies", type=int, default=100, help="simulator companies (default 100)")
    p.add_argument("--neonize-companies", type=int, default=5, help="neonize workers run at once (default 5)")
    p.add_argument("--neonize-settle", type=float, default=5.0,
                   help="seconds after every neonize client dialed before measuring (default 5)")
    p.add_argument("--idle-seconds", type=float, default=30.0)
    p.add_argument("--ready-runs", type=int, default=5)
    p.add_argument("--kills", type=int, default=5)
    p.add_argument("--fast-rate", type=float, default=1000.0)
    p.add_argument("--skip-neonize", action="store_true")
    p.add_argument("--json", type=Path, help="also write every figure (raw) to this file")
    p.add_argument("--keep", action="store_true", help="keep the temporary directory (daemon logs)")
    p.add_argument("--phase", help=argparse.SUPPRESS)
    p.add_argument("--root", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args()

    if args.phase == "neonize":  # internal: run inside the isolated namespace
        try:
            result = neonize_phase(args.root, args.neonize_companies, args.neonize_settle)
        finally:
            cleanup()
        args.json.write_text(json.dumps(result, indent=2))
        return 0

    m = machine()
    base = Path(tempfile.mkdtemp(prefix="wbench-"))
    os.chmod(base, 0o700)
    results: dict[str, Any] = {"machine": m, "companies": args.companies}
    t_start = time.monotonic()
    try:
        say(f"[1/4] exec -> READY=1 (1 and {args.companies} companies, {args.ready_runs} runs each)")
        results["ready"] = bench_ready(base, args.companies, args.ready_runs)
        say(f"[2/4] all connected at connect_rate {args.fast_rate:g}/s")
        results["connect"] = [bench_connect_fast(base, args.companies, args.fast_rate)]
        say("[3/4] all connected at the default connect_rate (2/s); then RSS, idle CPU, memory, kill -9")
        results["idle"] = bench_default_rate_and_idle(base, args.companies, args.idle_seconds, args.kills)
        results["connect"].insert(0, {k: results["idle"][k] for k in
                                      ("rate", "ready_s", "all_connected_s", "status_notifications",
                                       "supervisor_cpu_s", "worker_restarts", "slowest_health_s",
                                       "stop_s", "exit_code",
                                       "leftover_workers")})
        if not args.skip_neonize:
            say(f"[4/4] neonize workers: {args.neonize_companies} behind a silent SOCKS5 listener on 127.0.0.1")
            results["neonize"] = bench_neonize(base, args.neonize_companies, args.neonize_settle)
            nz = results["neonize"]
            say(f"  neonize worker: Private {nz['Private']['median']:.1f} MiB, PSS {nz['Pss']['median']:.1f}, "
                f"RSS {nz['Rss']['median']:.1f} (median of {nz['companies']})")
    finally:
        cleanup()
        if args.keep:
            say(f"kept {base}")
        else:
            shutil.rmtree(base, ignore_errors=True)
    results["bench_seconds"] = time.monotonic() - t_start
    m["loadavg_end"] = Path("/proc/loadavg").read_text().split()[:3]
    print_table(m, results, args.companies)
    print(f"\nbench took {results['bench_seconds']:.0f} s")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


def cleanup() -> None:
    """End every daemon this process started (by pid), then any worker they left (by pid)."""
    for d in _DAEMONS:
        if d.proc is not None and d.proc.poll() is None:
            try:
                d.stop(timeout=30)
            except RuntimeError as exc:
                say(f"  ! {exc}".splitlines()[0])
        wait_workers_gone(d.root, timeout=5)


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        cleanup()
        sys.exit(130)
