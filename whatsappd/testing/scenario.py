"""Scenario helpers for the supervisor tests: a daemon running simulator companies, driven
through the HTTP API, with fast timings.

First-class test code like `whatsappd.testing.daemon`, which it builds on: real daemon and
worker subprocesses, real sockets, real files; nothing of ours is faked.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

from whatsappd.client import Response
from whatsappd.config import toml_value
from whatsappd.testing.daemon import DaemonProcess, wait_until

__all__ = [
    "SIM_ENV", "SimDaemon", "daemon_pool", "parse_iso", "process_gone", "process_state", "settled_tree_state",
    "sim_config", "tree_state",
]

#: Simulator timings for scenario tests: pairing lasts long enough for any test that does not
#: mean to watch it time out, and connecting is quick. The worker reads them from its environment.
SIM_ENV = {
    "WHATSAPPD_SIM_QR_FIRST": "30",
    "WHATSAPPD_SIM_QR_NEXT": "30",
    "WHATSAPPD_SIM_CONNECT_DELAY": "0.05",
}

#: Fast supervisor timings. The heartbeat timeout also bounds a new worker's boot (its first
#: message), which takes seconds on a loaded 2-core machine, so it is kept at 5 s; tests about
#: the heartbeat itself set a shorter one.
_FAST_TABLES: dict[str, dict[str, Any]] = {
    "reconnect": {"initial_delay": "100ms", "max_delay": "1s", "connect_rate": 100,
                  "connect_timeout": "10s"},
    "workers": {"heartbeat_interval": "200ms", "heartbeat_timeout": "5s", "stop_grace": "1s",
                "crash_limit": 5, "crash_window": "1m"},
    # Send pacing holds a real number to a few messages a minute; tests about pacing turn it on
    # with a scaled rate (tests/test_pacing.py).
    "pacing": {"enabled": False},
}


def sim_config(*companies: str, neonize: Iterable[str] = (), **tables: dict[str, Any]) -> str:
    """Config text for a SimDaemon: fast timings and one simulator company per id.

    Keyword arguments override settings table by table, e.g.
    `sim_config("acme", workers={"crash_limit": 2})`. `neonize` ids get the real engine; tests
    must never connect those (that would open a network connection).
    """
    merged = {name: dict(values) for name, values in _FAST_TABLES.items()}
    for name, values in tables.items():
        merged.setdefault(name, {}).update(values)
    lines: list[str] = []
    for name, values in merged.items():
        lines.append(f"[{name}]")
        lines.extend(f"{key} = {toml_value(value)}" for key, value in values.items())
    for cid in companies:
        lines += ["[[companies]]", f'id = "{cid}"', 'engine = "simulator"']
    for cid in neonize:
        lines += ["[[companies]]", f'id = "{cid}"', 'engine = "neonize"']
    return "\n".join(lines) + "\n"


class SimDaemon(DaemonProcess):
    """A DaemonProcess with helpers to drive and watch its companies through the API."""

    def __init__(self, root: Path, config: str | None = "", env: dict[str, str] | None = None,
                 store: dict[str, str] | None = None, **kw: Any) -> None:
        root.mkdir(parents=True, exist_ok=True)
        #: The config's [store] table ({}: the default, SQLite in the state directory).
        self.store = dict(store or {})
        if config is not None and self.store:
            config += "[store]\n" + "".join(f"{key} = {toml_value(value)}\n" for key, value in self.store.items())
        super().__init__(root, config, env={**SIM_ENV, **(env or {})}, **kw)

    # ------------------------------------------------------------------------------ the log

    def log_mark(self) -> int:
        """The log's current size: pass it to log_since() to see only what came after."""
        return self.log_path.stat().st_size if self.log_path.exists() else 0

    def log_since(self, mark: int = 0) -> list[dict[str, Any]]:
        """JSON log lines (the daemon's and its workers', one file) written after mark."""
        data = self.log_path.read_bytes()[mark:] if self.log_path.exists() else b""
        out = []
        for line in data.decode(errors="replace").splitlines():
            try:
                item = json.loads(line)
            except ValueError:
                continue
            if isinstance(item, dict):
                out.append(item)
        return out

    def log_lines(self, event: str, mark: int = 0, **match: Any) -> list[dict[str, Any]]:
        """Log lines with this event text and these field values."""
        return [e for e in self.log_since(mark)
                if e.get("event") == event and all(e.get(k) == v for k, v in match.items())]

    # ---------------------------------------------------------------------------- companies

    def companies(self) -> dict[str, dict[str, Any]]:
        """Every company's snapshot by id, from GET /v1/companies, which never starts anything
        (GET /v1/companies/{id} restores a stopped company that has a session)."""
        response = self.client.get("/v1/companies")
        assert response.status == 200, response.body
        return {c["id"]: c for c in response.json()["companies"]}

    def snapshot(self, company: str) -> dict[str, Any]:
        """One company's snapshot, read without side effects."""
        return self.companies()[company]

    def worker_pid(self, company: str) -> int | None:
        pid: int | None = self.snapshot(company)["worker"]["pid"]
        return pid

    def wait_state(self, company: str, *states: str, timeout: float = 10.0,
                   check: Callable[[dict[str, Any]], Any] | None = None) -> dict[str, Any]:
        """Poll (without side effects) until the company is in one of states and check(snapshot)
        holds; return that snapshot. A timeout shows the last snapshot seen."""
        seen: list[dict[str, Any]] = []

        def ready() -> dict[str, Any] | None:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"daemon exited with {self.proc.returncode}:\n{self.logs()[-4000:]}")
            snap = self.snapshot(company)
            seen[:] = [snap]
            if snap["state"] in states and (check is None or check(snap)):
                return snap
            return None

        try:
            result: dict[str, Any] = wait_until(ready, timeout, what=f"{company} to be {'/'.join(states)}")
        except TimeoutError as exc:
            raise TimeoutError(f"{exc}; last snapshot: {seen[-1] if seen else None}") from None
        return result

    def post(self, company: str, action: str, body: Any = None) -> Response:
        """POST /v1/companies/{company}/{action}."""
        return self.client.post(f"/v1/companies/{company}/{action}", body)

    def simulate(self, company: str, action: str, **args: Any) -> Response:
        """POST /v1/companies/{company}/simulate {"action": action, **args}."""
        return self.post(company, "simulate", {"action": action, **args})

    def connect_pairing(self, company: str, timeout: float = 10.0) -> dict[str, Any]:
        """Connect a company that has no session; wait until its QR code is served."""
        response = self.post(company, "connect")
        assert response.ok, response.body
        return self.wait_state(company, "pairing", timeout=timeout, check=lambda s: s["qr_available"])

    def pair(self, company: str, timeout: float = 10.0, **scan: Any) -> dict[str, Any]:
        """Connect a company without a session, scan its QR code, wait for `connected`."""
        self.connect_pairing(company, timeout)
        response = self.simulate(company, "scan", **scan)
        assert response.status == 200, response.body
        return self.wait_state(company, "connected", timeout=timeout)

    def start_paired(self, *companies: str, timeout: float = 30.0) -> SimDaemon:
        """Start the daemon and pair each company (none has a session yet); patient, for a loaded machine."""
        self.start(timeout=timeout)
        for company in companies:
            self.pair(company, timeout=timeout)
        return self

    def session_dir(self, company: str) -> Path:
        return self.state_dir / "sessions" / f"session-{company}"


@contextmanager
def daemon_pool(base: Path) -> Iterator[Callable[..., SimDaemon]]:
    """Make SimDaemons under base (d0, d1, ...); SIGKILL any still running at the end (their
    workers die with them: parent-death signal)."""
    made: list[SimDaemon] = []

    def make(config: str | None = "", root: Path | None = None, **kw: Any) -> SimDaemon:
        daemon = SimDaemon(root or base / f"d{len(made)}", config=config, **kw)
        made.append(daemon)
        return daemon

    try:
        yield make
    finally:
        for daemon in made:
            daemon.kill()


def process_state(pid: int) -> str | None:
    """The process's state letter from /proc (R, S, T stopped, Z zombie...), None if no such pid."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    # The state follows the command name, which is in parentheses and may contain spaces.
    return stat.rpartition(")")[2].split()[0]


def process_gone(pid: int) -> bool:
    """True if no process has this pid any more, or only its zombie is left (nothing runs)."""
    return process_state(pid) in (None, "Z", "X")


def parse_iso(text: str) -> float:
    """An API or log timestamp (ISO 8601, Z) as a Unix time."""
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def tree_state(root: Path, exclude: Iterable[Path] = ()) -> dict[str, tuple[int, int, int]]:
    """Every path under root with (mode, size, mtime_ns), links not followed. Two equal results
    prove nothing was created, removed or changed. Paths at or under `exclude` are skipped."""
    skip = [Path(p) for p in exclude]
    out: dict[str, tuple[int, int, int]] = {}
    for path in sorted(root.rglob("*")):
        if any(path == s or s in path.parents for s in skip):
            continue
        st = path.lstat()
        out[str(path.relative_to(root))] = (st.st_mode, st.st_size, st.st_mtime_ns)
    return out


def settled_tree_state(root: Path, exclude: Iterable[Path] = (), quiet: float = 0.5,
                       timeout: float = 15.0) -> dict[str, tuple[int, int, int]]:
    """tree_state once two reads `quiet` seconds apart agree: a daemon that just acted may still
    be writing what followed it (a journal commit, a checkpoint), which is not what a test that
    compares before and after an act means to catch."""
    deadline = time.monotonic() + timeout
    state = tree_state(root, exclude)
    while True:
        time.sleep(quiet)
        again = tree_state(root, exclude)
        if again == state or time.monotonic() > deadline:
            return again
        state = again
