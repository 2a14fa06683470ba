#!/usr/bin/env python3
"""Issue 4 benchmark: messaging. Prints figures; asserts nothing about timings.

    .venv/bin/python bench/bench_messaging.py [--json results.json] [--keep]

What it measures (each against the target from issue 4), with real `whatsappd run` daemons
(logging.level = "warning") and real simulator workers whose stored sessions are written
directly (as bench_supervisor.py does):

 1. Events from workers through the journal to a reader. A reader on `GET /v1/events`
    (raw AF_UNIX socket, chunked HTTP/1.1 parsed by hand, one json.loads per NDJSON line)
    receives `message.incoming` events that 1 and 4 companies emit with `simulate burst`:
    a. unpaced (`burst count=N`): the most the pipeline carries; sustained rate at the reader;
    b. paced at 5,000 events/s in total (`burst rate=5000/companies`): worker-to-reader latency,
       from each event's `emitted_at_ns` (time.time_ns() in the worker just before it writes
       the event to its channel) to the reader's time.time_ns() when the bytes arrived. Same
       machine, same clock. A reader cut off as too slow resumes from its last seq (counted).
 2. `POST /v1/companies/{id}/messages` with 32 concurrent keep-alive client connections
    (asyncio, raw AF_UNIX sockets, in client subprocesses whose CPU is reported), next to the
    ceiling: a bare aiohttp app in a subprocess on its own Unix socket answering the same POST
    with a small JSON 202 (body read and parsed). Two daemon cases:
    a. the company `simulate drop`ped (reconnecting): only acceptance is measured;
    b. the company connected: its sender sends while messages are being accepted (the figure
       includes that work; how many got sent in the window is shown too).
    Plus GET /v1/health on the daemon (HTTP + middlewares, no store) to split the cost.

The state directory is on the same filesystem as the bench's temporary directory (--tmp):
the accept path commits to SQLite with synchronous=FULL, so fsync latency matters; the bench
measures it there and prints it.

Every process it starts is ended by pid (daemons with SIGTERM, the ceiling server and client
subprocesses with SIGTERM/SIGKILL); workers must be gone after their daemon (reported if not).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
HERE = Path(__file__).resolve().parent
for p in (str(REPO), str(HERE)):
    if p not in sys.path:
        sys.path.insert(0, p)

from bench_supervisor import (  # noqa: E402
    company_ids,
    machine,
    print_rows,
    proc_cpu_seconds,
    wait_workers_gone,
    worker_pids_under,
    write_simulator_sessions,
)

from whatsappd.client import Client, DaemonUnavailable  # noqa: E402
from whatsappd.testing.daemon import DaemonProcess, clean_env, wait_until  # noqa: E402

#: every process started by this process, so that `finally` can end them all (by pid)
_DAEMONS: list[DaemonProcess] = []
_CHILDREN: list[subprocess.Popen[bytes]] = []

MESSAGE_BODY = {"to": "+55 11 98765-4321", "text": "hello from the bench"}
MESSAGE_PATH = "/v1/companies/{cid}/messages"


def say(*parts: Any) -> None:
    print(*parts, file=sys.stderr, flush=True)


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(q / 100 * (len(s) - 1))))]


# ------------------------------------------------------------------------------ machine extras


def fsync_latency(directory: Path, n: int = 200) -> dict[str, float]:
    """os.fsync of a 200-byte append, and SQLite WAL synchronous=FULL commits/s, in `directory`."""
    import sqlite3
    d = Path(tempfile.mkdtemp(dir=directory, prefix="fsync-"))
    try:
        fd = os.open(d / "f", os.O_WRONLY | os.O_CREAT, 0o600)
        times = []
        for _ in range(n):
            os.write(fd, b"x" * 200)
            t = time.perf_counter()
            os.fsync(fd)
            times.append(time.perf_counter() - t)
        os.close(fd)
        db = sqlite3.connect(d / "db", isolation_level=None)
        db.execute("PRAGMA journal_mode = WAL")
        db.execute("PRAGMA synchronous = FULL")
        db.execute("CREATE TABLE t (a TEXT)")
        t0 = time.perf_counter()
        for _ in range(n):
            db.execute("BEGIN IMMEDIATE")
            db.execute("INSERT INTO t VALUES (?)", ("x" * 200,))
            db.execute("COMMIT")
        commits = n / (time.perf_counter() - t0)
        db.close()
    finally:
        shutil.rmtree(d, ignore_errors=True)
    return {"fsync_p50_ms": pct(times, 50) * 1e3, "fsync_p99_ms": pct(times, 99) * 1e3,
            "sqlite_full_commits_per_s": commits}


def loadavg() -> list[str]:
    return Path("/proc/loadavg").read_text().split()[:3]


# ------------------------------------------------------------------------------ daemon


def daemon_config(ids: list[str]) -> str:
    lines = [
        "[logging]", 'format = "json"', 'level = "warning"',
        "[reconnect]", "connect_rate = 1000", 'initial_delay = "10ms"', 'connect_timeout = "600s"',
        # the figures are the outbox's own speed, as before send pacing (issue 12) existed
        "[pacing]", "enabled = false",
    ]
    for cid in ids:
        lines += ["[[companies]]", f'id = "{cid}"', 'engine = "simulator"']
    return "\n".join(lines) + "\n"


def start_daemon(root: Path, ids: list[str]) -> DaemonProcess:
    write_simulator_sessions(root / "state", ids)
    daemon = DaemonProcess(root, config=daemon_config(ids))
    _DAEMONS.append(daemon)
    daemon.start(timeout=30)
    client = daemon.client

    def all_connected() -> bool:
        companies = client.get("/v1/companies").json()["companies"]
        return sum(1 for c in companies if c["state"] == "connected") == len(ids)

    wait_until(all_connected, 30, 0.05, what=f"{len(ids)} companies connected")
    return daemon


def stop_daemon(daemon: DaemonProcess) -> None:
    code = daemon.stop(timeout=60)
    if code != 0:
        say(f"  ! daemon exited with {code}")
    left = wait_workers_gone(daemon.root)
    if left:
        say(f"  ! {left} worker(s) outlived the daemon (killed)")


def worker_pids(daemon: DaemonProcess) -> list[int]:
    return worker_pids_under(daemon.root)


def cpu_of(pids: list[int]) -> float:
    total = 0.0
    for pid in pids:
        try:
            total += proc_cpu_seconds(pid)
        except (FileNotFoundError, ProcessLookupError):
            pass
    return total


def self_cpu() -> float:
    t = os.times()
    return t.user + t.system


# ------------------------------------------------------------------------------ event reader


class EventReader:
    """GET /v1/events on a raw AF_UNIX socket, in a thread; records (recv_ns, seq, emitted_at_ns).

    Chunked transfer encoding is taken apart by hand and every NDJSON line goes through
    json.loads. Every line taken out of one recv() gets that recv's time.time_ns(). A
    `stream.end` (too_slow) line makes it reconnect with since=<last seq> (counted in `cuts`)."""

    def __init__(self, socket_path: Path, types: tuple[str, ...] = ("message.incoming",)) -> None:
        self.socket_path = str(socket_path)
        self.types = types
        self.records: list[tuple[int, int, int]] = []
        self.cuts = 0
        self.heartbeats = 0
        self.last_seq: int | None = None
        self.error: BaseException | None = None
        self.ended: str | None = None  # how the last stream ended, if it did
        self._stop = threading.Event()
        self._subscribed = threading.Event()
        self._thread = threading.Thread(target=self._run, name="event-reader", daemon=True)
        self._sock: socket.socket | None = None

    def start(self) -> EventReader:
        self._thread.start()
        if not self._subscribed.wait(10):
            raise RuntimeError(f"the event stream did not start: {self.error!r}")
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._sock is not None:
            try:
                self._sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self._thread.join(5)

    def count(self) -> int:
        return len(self.records)

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                if not self._one_stream():
                    return
        except BaseException as exc:  # noqa: BLE001 - reported by the bench
            if not self._stop.is_set():
                self.error = exc
        finally:
            self._subscribed.set()

    def _one_stream(self) -> bool:
        """Read one stream; True to reconnect (cut as too slow), False when done."""
        query = "&".join(f"type={t}" for t in self.types)
        if self.last_seq is not None:
            query += f"&since={self.last_seq}"
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 * 1024 * 1024)
        sock.connect(self.socket_path)
        self._sock = sock
        sock.sendall(f"GET /v1/events?{query} HTTP/1.1\r\nHost: localhost\r\nAccept: application/x-ndjson\r\n\r\n"
                     .encode())
        raw = b""
        while b"\r\n\r\n" not in raw:
            chunk = sock.recv(65536)
            if not chunk:
                raise RuntimeError("the daemon closed the event stream before its headers")
            raw += chunk
        head, _, raw = raw.partition(b"\r\n\r\n")
        status = head.split(b"\r\n", 1)[0]
        if b" 200 " not in status:
            raise RuntimeError(f"GET /v1/events answered {status!r}: {raw[:500]!r}")
        chunked = b"transfer-encoding: chunked" in head.lower()
        self._subscribed.set()
        records = self.records
        loads = json.loads
        buf = bytearray(raw)  # undecoded (chunked) bytes
        body = bytearray()    # decoded bytes, not yet a whole line
        now = time.time_ns()
        last_chunk = False
        while True:
            if chunked:
                pos = 0
                while True:
                    i = buf.find(b"\r\n", pos)
                    if i < 0:
                        break
                    size = int(buf[pos:i].split(b";", 1)[0], 16)
                    if size == 0:
                        last_chunk = True  # the end of the response; the lines before it still count
                        break
                    if len(buf) < i + 2 + size + 2:
                        break
                    body += buf[i + 2:i + 2 + size]
                    pos = i + 2 + size + 2
                del buf[:pos]
            else:
                body += buf
                buf.clear()
            end = body.rfind(b"\n")
            if end >= 0:
                for line in bytes(body[:end]).split(b"\n"):
                    item = loads(line)
                    seq = item.get("seq")
                    if seq is not None:
                        self.last_seq = seq
                        records.append((now, seq, item.get("emitted_at_ns") or 0))
                    elif item.get("type") == "heartbeat":
                        self.heartbeats += 1
                    elif item.get("type") == "stream.end":
                        if item.get("reason") == "too_slow":
                            self.cuts += 1
                            self.last_seq = item.get("resume_from", self.last_seq)
                            sock.close()
                            return True
                        self.ended = f"stream.end {item.get('reason')}"
                        return False
                del body[:end + 1]
            if last_chunk:
                self.ended = "the daemon ended the response without a stream.end line"
                return False
            chunk = sock.recv(1 << 20)
            now = time.time_ns()
            if not chunk:
                if not self._stop.is_set():
                    self.ended = "the daemon closed the connection without a stream.end line"
                return False
            buf += chunk


def post_simulate(socket_path: Path, cid: str, body: dict[str, Any], out: list[Any]) -> None:
    try:
        resp = Client(str(socket_path), timeout=120).post(f"/v1/companies/{cid}/simulate", body)
        out.append((cid, resp.status, resp.json(), time.time_ns()))
    except BaseException as exc:  # noqa: BLE001
        out.append((cid, None, repr(exc), time.time_ns()))


def run_bursts(daemon: DaemonProcess, ids: list[str], per_company: int, rate: float | None,
               timeout: float) -> dict[str, Any]:
    """Start a reader, burst from every company at once, wait for every event at the reader."""
    reader = EventReader(daemon.socket_path).start()
    workers = worker_pids(daemon)
    cpu0 = {"daemon": cpu_of([daemon.pid]), "workers": cpu_of(workers), "reader": self_cpu()}
    replies: list[Any] = []
    body: dict[str, Any] = {"action": "burst", "count": per_company}
    if rate is not None:
        body["rate"] = rate
    t_start = time.time_ns()
    threads = [threading.Thread(target=post_simulate, args=(daemon.socket_path, cid, body, replies), daemon=True)
               for cid in ids]
    for t in threads:
        t.start()
    expected = per_company * len(ids)
    deadline = time.monotonic() + timeout
    while (reader.count() < expected and time.monotonic() < deadline and reader.error is None
           and reader.ended is None):
        time.sleep(0.01)
    t_end = time.time_ns()
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()) + 5)
    cpu1 = {"daemon": cpu_of([daemon.pid]), "workers": cpu_of(workers), "reader": self_cpu()}
    reader.stop()
    recs = reader.records
    emitted = sum(r[2].get("emitted", 0) for r in replies if isinstance(r[2], dict))
    bad = [r for r in replies if r[1] != 200]
    out: dict[str, Any] = {
        "companies": len(ids), "per_company": per_company, "rate_per_company": rate,
        "expected": expected, "emitted": emitted, "received": len(recs), "cuts": reader.cuts,
        "reader_error": repr(reader.error) if reader.error else None, "stream_ended": reader.ended,
        "simulate_errors": [str(r) for r in bad],
    }
    if recs:
        recv = [r[0] for r in recs]
        span = (recv[-1] - recv[0]) / 1e9
        out["first_to_last_s"] = span
        out["reader_rate"] = (len(recs) - 1) / span if span > 0 else float("nan")
        out["start_to_last_s"] = (recv[-1] - t_start) / 1e9
        # Steady state: the middle 80% of the events (skips the ramp-up and the tail).
        lo, hi = len(recs) // 10, len(recs) * 9 // 10
        mid = (recv[hi] - recv[lo]) / 1e9
        out["steady_rate"] = (hi - lo) / mid if mid > 0 else float("nan")
        emit = [r[2] for r in recs if r[2]]
        if len(emit) > 1:
            out["emit_rate"] = (len(emit) - 1) / ((max(emit) - min(emit)) / 1e9)
        lat = [(r[0] - r[2]) / 1e6 for r in recs if r[2]]
        out["latency_ms"] = {"p50": pct(lat, 50), "p90": pct(lat, 90), "p99": pct(lat, 99),
                             "p999": pct(lat, 99.9), "max": max(lat) if lat else float("nan")}
        seqs = [r[1] for r in recs]
        out["seq_in_order"] = seqs == sorted(seqs)
        out["duplicates"] = len(seqs) - len(set(seqs))
    wall = (t_end - t_start) / 1e9
    out["cpu_share"] = {k: (cpu1[k] - cpu0[k]) / wall for k in cpu0}  # cores used over the run
    # CPU time per event: less sensitive to other load on the machine than the rates are.
    out["cpu_us_per_event"] = {k: (cpu1[k] - cpu0[k]) / max(1, len(recs)) * 1e6 for k in cpu0}
    return out


def bench_events(base: Path, n_companies: list[int], unpaced_total: int, paced_rate: float,
                 paced_seconds: float) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for n in n_companies:
        root = base / f"events-{n}"
        ids = company_ids(n, "ev")
        daemon = start_daemon(root, ids)
        try:
            say(f"  {n} compan{'y' if n == 1 else 'ies'}: warm-up burst")
            run_bursts(daemon, ids, 1000 // n, None, 30)
            say(f"  {n} compan{'y' if n == 1 else 'ies'}: unpaced burst of {unpaced_total}")
            unpaced = run_bursts(daemon, ids, unpaced_total // n, None, 120)
            say(f"    reader {unpaced.get('reader_rate', 0):,.0f}/s (steady {unpaced.get('steady_rate', 0):,.0f}/s), "
                f"emitted at {unpaced.get('emit_rate', 0):,.0f}/s, received {unpaced['received']}/"
                f"{unpaced['expected']}, cuts {unpaced['cuts']}, cpu {fmt_cpu(unpaced['cpu_share'])}")
            per = paced_rate / n
            count = int(per * paced_seconds)
            say(f"  {n} compan{'y' if n == 1 else 'ies'}: paced {paced_rate:,.0f}/s for {paced_seconds:g}s")
            paced = run_bursts(daemon, ids, count, per, paced_seconds * 3 + 30)
            lat = paced.get("latency_ms", {})
            say(f"    reader {paced.get('reader_rate', 0):,.0f}/s, latency p50 {lat.get('p50', 0):.2f} "
                f"p99 {lat.get('p99', 0):.2f} max {lat.get('max', 0):.2f} ms, received {paced['received']}/"
                f"{paced['expected']}, cuts {paced['cuts']}, cpu {fmt_cpu(paced['cpu_share'])}")
            out[str(n)] = {"unpaced": unpaced, "paced": paced}
        finally:
            stop_daemon(daemon)
    return out


def fmt_cpu(share: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.2f}" for k, v in share.items())


# ------------------------------------------------------------------------------ POST load


def _client_main(argv: list[str]) -> int:
    """Client subprocess: N keep-alive connections POSTing for `duration` seconds; prints JSON."""
    sock_path, path, conns, warmup, duration, body_json, method = argv
    n_conns, warm, dur = int(conns), float(warmup), float(duration)
    body = body_json.encode()
    if method == "GET":
        request = f"GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n".encode()
    else:
        request = (f"POST {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
                   f"Content-Length: {len(body)}\r\n\r\n").encode() + body

    async def main() -> dict[str, Any]:
        statuses: dict[int, int] = {}
        latencies: list[float] = []
        errors: list[str] = []
        t0 = time.monotonic()
        measure_from = t0 + warm
        stop_at = measure_from + dur
        counted = 0
        total = 0

        async def one() -> None:
            nonlocal counted, total
            reader, writer = await asyncio.open_unix_connection(sock_path)
            try:
                while True:
                    start = time.monotonic()
                    if start >= stop_at:
                        return
                    writer.write(request)
                    head = await reader.readuntil(b"\r\n\r\n")
                    status = int(head[9:12])
                    length = 0
                    for line in head.split(b"\r\n"):
                        if line[:15].lower() == b"content-length:":
                            length = int(line[15:])
                    if length:
                        await reader.readexactly(length)
                    end = time.monotonic()
                    total += 1
                    if start >= measure_from and end <= stop_at:
                        statuses[status] = statuses.get(status, 0) + 1
                        latencies.append(end - start)
                        counted += 1
            except Exception as exc:  # noqa: BLE001
                errors.append(repr(exc))
            finally:
                writer.close()

        cpu0 = self_cpu()
        await asyncio.gather(*(one() for _ in range(n_conns)))
        cpu = self_cpu() - cpu0
        wall = time.monotonic() - t0
        return {"requests": counted, "all_requests": total, "statuses": statuses, "duration": dur,
                "rate": counted / dur,
                "latency_ms": {"p50": pct(latencies, 50) * 1e3, "p99": pct(latencies, 99) * 1e3,
                               "max": max(latencies) * 1e3 if latencies else float("nan")},
                "cpu_share": cpu / wall, "errors": errors[:5], "error_count": len(errors)}

    print(json.dumps(asyncio.run(main())), flush=True)
    return 0


def load(sock_path: Path, path: str, conns: int, procs: int, warmup: float, duration: float,
         method: str = "POST") -> dict[str, Any]:
    """conns connections spread over `procs` client subprocesses; figures summed."""
    per = [conns // procs + (1 if i < conns % procs else 0) for i in range(procs)]
    children = []
    for n in per:
        child = subprocess.Popen(
            [sys.executable, __file__, "--_client", str(sock_path), path, str(n), str(warmup), str(duration),
             json.dumps(MESSAGE_BODY), method],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=clean_env(), cwd=str(REPO))
        _CHILDREN.append(child)
        children.append(child)
    results = []
    for child in children:
        out, err = child.communicate(timeout=warmup + duration + 60)
        if child.returncode != 0:
            raise RuntimeError(f"client exited with {child.returncode}: {err.decode()[-2000:]}")
        results.append(json.loads(out))
    statuses: dict[str, int] = {}
    for r in results:
        for k, v in r["statuses"].items():
            statuses[k] = statuses.get(k, 0) + v
    return {
        "conns": conns, "procs": procs, "rate": sum(r["rate"] for r in results), "statuses": statuses,
        "all_requests": sum(r["all_requests"] for r in results),
        "latency_ms_p50": statistics.median(r["latency_ms"]["p50"] for r in results),
        "latency_ms_p99": max(r["latency_ms"]["p99"] for r in results),
        "latency_ms_max": max(r["latency_ms"]["max"] for r in results),
        "client_cpu_share": [r["cpu_share"] for r in results],
        "client_errors": sum(r["error_count"] for r in results),
        "client_error_samples": [e for r in results for e in r["errors"]][:3],
    }


CEILING_APP = r'''
import json, os, socket, sys
from aiohttp import web

async def post(request):
    body = await request.json()
    return web.json_response({"id": "msg_0123456789abcdef01234567", "status": "queued",
                              "to": body.get("to")}, status=202)

async def health(request):
    return web.json_response({"status": "ok"})

app = web.Application()
app.router.add_post("/v1/companies/{id}/messages", post)
app.router.add_get("/v1/health", health)
path = sys.argv[1]
sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
sock.bind(path)
os.chmod(path, 0o600)
web.run_app(app, sock=sock, access_log=None, print=None, handle_signals=True)
'''


def start_ceiling(root: Path) -> tuple[subprocess.Popen[bytes], Path]:
    root.mkdir(parents=True, exist_ok=True)
    sock_path = root / "ceiling.sock"
    script = root / "ceiling_app.py"
    script.write_text(CEILING_APP)
    proc = subprocess.Popen([sys.executable, str(script), str(sock_path)], env=clean_env(), cwd=str(root),
                            stdout=subprocess.DEVNULL, stderr=open(root / "ceiling.log", "wb"))  # noqa: SIM115
    _CHILDREN.append(proc)

    def answering() -> bool:
        if proc.poll() is not None:
            raise RuntimeError(f"the ceiling app exited with {proc.returncode}: {(root / 'ceiling.log').read_text()}")
        try:
            return Client(str(sock_path), timeout=5).get("/v1/health").ok
        except (OSError, DaemonUnavailable):
            return False

    wait_until(answering, 20, 0.05, what="the bare aiohttp app")
    return proc, sock_path


def end_child(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def outbox_counts(daemon: DaemonProcess) -> dict[str, int]:
    text = daemon.client.get("/v1/metrics").body.decode()
    out = {}
    for line in text.splitlines():
        if line.startswith("whatsappd_outbox_messages{"):
            status = line.split('"')[1]
            out[status] = int(float(line.rsplit(" ", 1)[1]))
    return out


def bench_post(base: Path, conns: int, procs: int, warmup: float, duration: float) -> dict[str, Any]:
    out: dict[str, Any] = {}
    path = MESSAGE_PATH.format(cid="acme")

    say(f"  ceiling: bare aiohttp app, {conns} connections over {procs} client process(es)")
    proc, sock_path = start_ceiling(base / "ceiling")
    try:
        cpu0 = proc_cpu_seconds(proc.pid)
        t0 = time.monotonic()
        out["ceiling"] = load(sock_path, path, conns, procs, warmup, duration)
        cpu = proc_cpu_seconds(proc.pid) - cpu0
        out["ceiling"]["server_cpu_share"] = cpu / (time.monotonic() - t0)
        out["ceiling"]["server_cpu_us_per_request"] = cpu / max(1, out["ceiling"]["all_requests"]) * 1e6
        out["ceiling_get"] = load(sock_path, "/v1/health", conns, procs, warmup, duration, method="GET")
    finally:
        end_child(proc)
    say(f"    POST {out['ceiling']['rate']:,.0f}/s (p99 {out['ceiling']['latency_ms_p99']:.1f} ms, client cpu "
        f"{out['ceiling']['client_cpu_share']}, server cpu {out['ceiling']['server_cpu_share']:.2f}); "
        f"GET {out['ceiling_get']['rate']:,.0f}/s")

    for case in ("dropped", "connected"):
        root = base / f"post-{case}"
        daemon = start_daemon(root, ["acme"])
        try:
            if case == "dropped":
                resp = daemon.client.post("/v1/companies/acme/simulate", {"action": "drop"})
                if not resp.ok:
                    raise RuntimeError(f"simulate drop: {resp.status} {resp.body!r}")
                wait_until(lambda d=daemon: d.client.get("/v1/companies/acme").json()["state"] == "reconnecting",
                           10, what="acme reconnecting")
            else:
                # Warm up the send path (first send, worker's send log) before measuring.
                daemon.client.post("/v1/companies/acme/messages?wait=sent", MESSAGE_BODY)
            say(f"  daemon, company {case}: {conns} connections over {procs} client process(es)")
            before = outbox_counts(daemon)
            workers = worker_pids(daemon)
            cpu0, wcpu0, t0 = cpu_of([daemon.pid]), cpu_of(workers), time.monotonic()
            result = load(daemon.socket_path, path, conns, procs, warmup, duration)
            wall = time.monotonic() - t0
            cpu = cpu_of([daemon.pid]) - cpu0
            result["daemon_cpu_share"] = cpu / wall
            result["daemon_cpu_us_per_request"] = cpu / max(1, result["all_requests"]) * 1e6
            result["worker_cpu_share"] = (cpu_of(workers) - wcpu0) / wall
            after = outbox_counts(daemon)
            result["outbox_before"], result["outbox_after"] = before, after
            sent_states = ("sent", "delivered", "read")
            result["sent_during"] = (sum(after.get(s, 0) for s in sent_states)
                                     - sum(before.get(s, 0) for s in sent_states))
            result["send_rate_during"] = result["sent_during"] / wall
            out[f"daemon_{case}"] = result
            say(f"    {result['rate']:,.0f}/s accepted (statuses {result['statuses']}, p50 "
                f"{result['latency_ms_p50']:.1f} p99 {result['latency_ms_p99']:.1f} ms), daemon cpu "
                f"{result['daemon_cpu_share']:.2f}, client cpu {result['client_cpu_share']}, "
                f"sent during: {result['sent_during']} ({result['send_rate_during']:,.0f}/s)")
            if case == "dropped":
                health = load(daemon.socket_path, "/v1/health", conns, procs, warmup, duration, method="GET")
                out["daemon_health_get"] = health
                say(f"    GET /v1/health {health['rate']:,.0f}/s")
        finally:
            stop_daemon(daemon)
    return out


# ------------------------------------------------------------------------------ report


def print_table(m: dict[str, Any], fs: dict[str, float], ev: dict[str, Any], post: dict[str, Any],
                paced_rate: float) -> None:
    rows: list[tuple[str, str, str]] = []
    for n, r in ev.items():
        u, p = r["unpaced"], r["paced"]
        value = (f"{u.get('reader_rate', float('nan')):,.0f}/s "
                 f"(steady {u.get('steady_rate', float('nan')):,.0f}/s)")
        if u["received"] != u["expected"]:
            value += f" - only {u['received']} received"
        if u["cuts"]:
            value += f", {u['cuts']} cut(s)"
        rows.append((f"events, max unpaced rate at the reader ({n} co., {u['expected']:,} events)", value, "5,000/s"))
        lat = p.get("latency_ms", {})
        rows.append((f"events, paced {paced_rate:,.0f}/s: sustained at the reader ({n} co.)",
                     f"{p.get('reader_rate', float('nan')):,.0f}/s", "5,000/s"))
        rows.append((f"events, paced {paced_rate:,.0f}/s: worker->reader latency p50 / p99 / max ({n} co.)",
                     f"{lat.get('p50', float('nan')):.1f} / {lat.get('p99', float('nan')):.1f} / "
                     f"{lat.get('max', float('nan')):.1f} ms", "p99 < 50 ms"))
    c = post["ceiling"]
    for case in ("dropped", "connected"):
        d = post[f"daemon_{case}"]
        label = ("POST messages, company dropped (acceptance only)" if case == "dropped"
                 else "POST messages, company connected (sender sending too)")
        rows.append((label, f"{d['rate']:,.0f}/s = {d['rate'] / c['rate']:.2f} x ceiling "
                     f"(p99 {d['latency_ms_p99']:.0f} ms)", "1,000/s"))
    rows.append(("ceiling: bare aiohttp POST -> 202 JSON, same socket kind",
                 f"{c['rate']:,.0f}/s (p99 {c['latency_ms_p99']:.0f} ms)", "-"))
    rows.append(("daemon GET /v1/health (HTTP + middlewares, no store)",
                 f"{post['daemon_health_get']['rate']:,.0f}/s (ceiling GET {post['ceiling_get']['rate']:,.0f}/s)", "-"))
    rows.append(("sent by the sender while accepting (connected case)",
                 f"{post['daemon_connected']['send_rate_during']:,.0f}/s", "-"))
    print(f"whatsappd messaging benchmark - {m['date']}")
    print(f"machine: {m['nproc']} CPUs ({m['cpu_model']}), {m['memory_gib']} GiB, Python {m['python']}, "
          f"kernel {m['kernel']}")
    print(f"state dir filesystem: fsync p50 {fs['fsync_p50_ms']:.2f} ms, p99 {fs['fsync_p99_ms']:.2f} ms; "
          f"SQLite WAL synchronous=FULL {fs['sqlite_full_commits_per_s']:,.0f} commits/s (one row each)")
    print(f"load average: start {' '.join(m['loadavg_start'])}, end {' '.join(loadavg())}")
    print()
    print_rows(rows)


def cleanup() -> None:
    for proc in _CHILDREN:
        try:
            end_child(proc)
        except Exception as exc:  # noqa: BLE001
            say(f"  ! could not end pid {proc.pid}: {exc}")
    for daemon in _DAEMONS:
        try:
            if daemon.proc is not None and daemon.proc.poll() is None:
                daemon.stop(timeout=30)
        except Exception as exc:  # noqa: BLE001
            say(f"  ! could not stop daemon {daemon.pid}: {exc}")
            daemon.kill()
        wait_workers_gone(daemon.root)


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--_client":
        return _client_main(sys.argv[2:])
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--companies", default="1,4", help="company counts for the event phase (default 1,4)")
    p.add_argument("--burst", type=int, default=40_000, help="events in the unpaced burst (default 40000)")
    p.add_argument("--paced-rate", type=float, default=5000.0, help="total paced rate, events/s (default 5000)")
    p.add_argument("--paced-seconds", type=float, default=8.0, help="length of the paced burst (default 8)")
    p.add_argument("--conns", type=int, default=32, help="concurrent client connections (default 32)")
    p.add_argument("--client-procs", type=int, default=1, help="client processes sharing them (default 1)")
    p.add_argument("--warmup", type=float, default=1.0, help="seconds of load before measuring (default 1)")
    p.add_argument("--duration", type=float, default=6.0, help="seconds measured per load run (default 6)")
    p.add_argument("--skip-events", action="store_true")
    p.add_argument("--skip-post", action="store_true")
    p.add_argument("--tmp", type=Path, default=None, help="parent of the temporary directory (default: $TMPDIR)")
    p.add_argument("--json", type=Path, help="also write every figure (raw) to this file")
    p.add_argument("--keep", action="store_true", help="keep the temporary directory (daemon logs)")
    args = p.parse_args()

    m = machine()
    base = Path(tempfile.mkdtemp(prefix="whatsappd-bench-msg-", dir=args.tmp))
    say(f"bench root: {base}")
    results: dict[str, Any] = {"machine": m}
    try:
        fs = fsync_latency(base)
        results["fsync"] = fs
        say(f"fsync p50 {fs['fsync_p50_ms']:.2f} ms, SQLite FULL {fs['sqlite_full_commits_per_s']:,.0f} commits/s")
        if not args.skip_events:
            say("1. events: workers -> journal -> reader")
            results["events"] = bench_events(base, [int(x) for x in args.companies.split(",")], args.burst,
                                             args.paced_rate, args.paced_seconds)
        if not args.skip_post:
            say(f"2. POST messages, {args.conns} concurrent connections")
            results["post"] = bench_post(base, args.conns, args.client_procs, args.warmup, args.duration)
        results["machine"]["loadavg_end"] = loadavg()
    finally:
        cleanup()
        if args.keep:
            say(f"kept {base}")
        else:
            shutil.rmtree(base, ignore_errors=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, default=str) + "\n")
    if "events" in results and "post" in results:
        print_table(m, results["fsync"], results["events"], results["post"], args.paced_rate)
    else:
        print(json.dumps(results, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
