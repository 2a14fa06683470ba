"""Several real whatsappd hosts on one PostgreSQL, and an independent double-owner checker.

First-class test code like `whatsappd.testing.daemon`, which it builds on: each host is a real
`whatsappd run` subprocess with its own state directory and control socket, sharing one
database (`[store] backend = "postgresql"`, `[cluster] enabled = true`, host ids h1..hN) and
one shared simulator "server" directory (`[simulator] server_dir`). The acceptance tests and
bench/bench_cluster.py drive the same code.

A host is a process TREE: the supervisor, its zygote(s), and workers that are the supervisor's
children but sit in sessions of their own (a worker calls setsid). A host is therefore started
in a process group of its own, and "the host" is that group plus every descendant of the
supervisor, found in /proc: `kill()` SIGKILLs all of it (a dead machine), `freeze()` SIGSTOPs
all of it (a paused VM: supervisor first, so it forks nothing meanwhile), `thaw()` SIGCONTs it.

The `Checker` trusts nothing the hosts say about themselves. Every 100 ms it samples:
- the live worker processes of every host, from /proc: a worker is a descendant of the host's
  supervisor that holds its session lock (`session-<id>/whatsappd.lock`; a forked worker's
  command line is its zygote's) or an exec'd `whatsappd.worker --company <id>`; a stopped
  process (state T) is frozen and counted apart, a zombie is dead;
- the shared simulator server's live connections per company, when a source is given;
- the lease table, from a connection of its own (owner, token, live).
A sample where one company has non-frozen live workers on two hosts, or two live server
connections, is a double owner; a company's token going down is recorded too. Zero is the target.
"""

from __future__ import annotations

import functools
import importlib
import os
import re
import signal
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from whatsappd.config import toml_value
from whatsappd.sessionstore import SIMULATOR_FILE, SimulatorDevice, simulator_store_bytes
from whatsappd.testing.daemon import at_once, wait_until
from whatsappd.testing.scenario import SimDaemon, sim_config

__all__ = [
    "Checker", "Cluster", "ClusterHost", "Lease", "ProcessTable", "Sample", "Violation", "WorkerProc",
    "cluster_config", "read_leases", "server_connections",
]

_LOCK_PATH = re.compile(r"/session-([^/]+)/whatsappd\.lock$")


def cluster_config(host_id: str, dsn: str, companies: Iterable[str], *, neonize: Mapping[str, str] | None = None,
                   lease_ttl: float = 3.0, renew_interval: float = 0.5, fence_margin: float = 1.0,
                   max_companies: int = 400, server_dir: Path | None = None, whatsmeow_dsn: str = "",
                   clustered: bool = True, **tables: dict[str, Any]) -> str:
    """One host's config: the scenario tests' fast timings, the PostgreSQL store, [cluster] with
    this host id, and the same [[companies]] as every other host (neonize: id -> proxy URL).

    clustered=False leaves the store and [cluster] out: independent single hosts (SQLite) that
    know the same companies, which is what a double owner looks like (the checker's own test)."""
    store: dict[str, Any] = {"backend": "postgresql", "dsn": dsn}
    if whatsmeow_dsn:
        store["whatsmeow_dsn"] = whatsmeow_dsn
    cluster = {"enabled": True, "host_id": host_id, "lease_ttl": f"{lease_ttl}s",
               "renew_interval": f"{renew_interval}s", "fence_margin": f"{fence_margin}s",
               "max_companies": max_companies}
    extra: dict[str, dict[str, Any]] = {"store": store, "cluster": cluster} if clustered else {}
    extra.update(tables)
    if server_dir is not None:
        extra.setdefault("simulator", {})["server_dir"] = str(server_dir)
    text = sim_config(*companies, **extra)
    for cid, proxy in (neonize or {}).items():
        text += f'[[companies]]\nid = "{cid}"\nengine = "neonize"\nproxy = {toml_value(proxy)}\n'
    return text


# ----------------------------------------------------------------------------- processes


@dataclass(frozen=True)
class WorkerProc:
    """A worker process found in /proc: which host's, which company's, whether it is frozen."""

    host: str
    company: str
    pid: int
    frozen: bool


class ProcessTable:
    """One read of /proc: every process's parent and state letter, and the children map."""

    def __init__(self) -> None:
        self.parent: dict[int, int] = {}
        self.state: dict[int, str] = {}
        self.start: dict[int, int] = {}
        self.children: dict[int, list[int]] = {}
        for name in os.listdir("/proc"):
            if not name.isdigit():
                continue
            try:
                with open(f"/proc/{name}/stat") as f:
                    stat = f.read()
            except OSError:
                continue  # gone meanwhile
            fields = stat.rpartition(")")[2].split()
            pid = int(name)
            self.state[pid], self.parent[pid], self.start[pid] = fields[0], int(fields[1]), int(fields[19])
            self.children.setdefault(int(fields[1]), []).append(pid)

    def descendants(self, pid: int) -> list[int]:
        """pid's descendants (not pid), parents before children."""
        out: list[int] = []
        todo = list(self.children.get(pid, ()))
        while todo:
            child = todo.pop()
            out.append(child)
            todo.extend(self.children.get(child, ()))
        return out

    def alive(self, pid: int) -> bool:
        return self.state.get(pid) not in (None, "Z", "X")

    def frozen(self, pid: int) -> bool:
        return self.state.get(pid) in ("T", "t")


def _worker_company(pid: int) -> str | None:
    """The company a process works for, or None if it is not a worker (yet)."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return None
    if b"whatsappd.worker" in argv and b"--company" in argv:  # an exec'd worker says so
        i = argv.index(b"--company")
        return argv[i + 1].decode() if i + 1 < len(argv) else None
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return None
    for fd in fds:  # a forked worker has its zygote's command line, but holds its session lock
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        match = _LOCK_PATH.search(target)
        if match:
            return match.group(1)
    return None


# ----------------------------------------------------------------------------- leases


@dataclass(frozen=True)
class Lease:
    """A lease row as the database sees it now."""

    owner: str | None
    token: int | None
    live: bool


def read_leases(db: Any) -> dict[str, Lease]:
    """Every lease row (a psycopg connection, autocommit); {} before the table exists."""
    import psycopg

    try:
        rows = db.execute("SELECT company, owner, token, expires_at > now() FROM whatsappd_company_leases").fetchall()
    except psycopg.errors.UndefinedTable:
        return {}
    return {str(c): Lease(o, None if t is None else int(t), bool(live)) for c, o, t, live in rows}


# ----------------------------------------------------------------------------- hosts


class ClusterHost(SimDaemon):
    """One host: a SimDaemon in a process group of its own, with its id."""

    def __init__(self, root: Path, host_id: str, config: str, env: dict[str, str] | None = None) -> None:
        super().__init__(root, config, env=env, start_new_session=True)
        self.host_id = host_id

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def tree(self, table: ProcessTable | None = None) -> list[int]:
        """The supervisor and every descendant, live or frozen ([] when it is not running)."""
        if not self.running():
            return []
        table = table or ProcessTable()
        return [self.pid, *self.descendants(table)]

    def descendants(self, table: ProcessTable) -> list[int]:
        return [p for p in table.descendants(self.pid) if table.alive(p)] if self.running() else []

    def workers(self, table: ProcessTable, cache: dict[tuple[int, int], str | None] | None = None) -> list[WorkerProc]:
        """The live worker processes of this host, by /proc alone."""
        out = []
        for pid in self.descendants(table):
            key = (pid, table.start.get(pid, 0))
            if cache is not None and key in cache:
                company = cache[key]
            else:
                company = _worker_company(pid)
                if cache is not None and company is not None:  # a worker-to-be takes its lock later
                    cache[key] = company
            if company is not None:
                out.append(WorkerProc(self.host_id, company, pid, table.frozen(pid)))
        return out

    def _signal_tree(self, sig: int) -> None:
        for pid in self.tree():
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass

    def kill(self) -> None:
        """SIGKILL the whole host at once (its process group and every descendant): a dead machine."""
        if self.proc is None or self.proc.poll() is not None:
            return
        table = ProcessTable()
        pids = [self.pid, *table.descendants(self.pid)]
        try:
            os.killpg(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.proc.wait()
        # The workers were the supervisor's children: with it gone, init reaps them. Wait until
        # none is left, so "killed" means nothing of this host runs any more.
        wait_until(lambda: all(not ProcessTable().alive(p) for p in pids), 10, what="the host's processes to die")

    def freeze(self) -> None:
        """SIGSTOP the whole host (a paused VM): the supervisor first, so it starts nothing
        meanwhile, then every descendant until all are stopped."""
        assert self.running()
        os.kill(self.pid, signal.SIGSTOP)
        for _ in range(50):
            table = ProcessTable()
            running = [p for p in self.tree(table) if not table.frozen(p)]
            if not running:
                return
            for pid in running:
                try:
                    os.kill(pid, signal.SIGSTOP)
                except ProcessLookupError:
                    pass
            time.sleep(0.01)
        raise RuntimeError(f"host {self.host_id} did not stop")

    def thaw(self) -> None:
        """SIGCONT the whole host at once."""
        self._signal_tree(signal.SIGCONT)


# ----------------------------------------------------------------------------- cluster


def _named(dsn: str, name: str) -> str:
    """dsn (a URL) with application_name=name, so pg_stat_activity tells whose a connection is."""
    return f"{dsn}{'&' if '?' in dsn else '?'}application_name={name}"


class Cluster:
    """N hosts h1..hN sharing one database, the same companies, and one simulator server dir."""

    def __init__(self, root: Path, dsn: str, companies: Iterable[str], *, hosts: int = 3,
                 neonize: Mapping[str, str] | None = None, env: dict[str, str] | None = None, **config: Any) -> None:
        self.root, self.dsn = root, dsn
        self.companies = list(companies)  # simulator companies
        self.neonize = dict(neonize or {})
        self.server_dir = root / "simserver"
        self.server_dir.mkdir(parents=True, exist_ok=True)
        self.config = config
        # Each host names its connections (pg_stat_activity.application_name): whatsappd-hN for
        # the daemon's, whatsmeow-hN for its neonize workers' (through `whatsmeow_dsn` if given).
        whatsmeow = config.pop("whatsmeow_dsn", "") or dsn
        self.hosts = [
            ClusterHost(root / f"h{i}", f"h{i}",
                        cluster_config(f"h{i}", _named(dsn, f"whatsappd-h{i}"), self.companies, neonize=self.neonize,
                                       server_dir=self.server_dir, whatsmeow_dsn=_named(whatsmeow, f"whatsmeow-h{i}"),
                                       **config),
                        env={"WHATSAPPD_LOOPBACK_ONLY": "1", **(env or {})})
            for i in range(1, hosts + 1)
        ]
        self._db: Any = None

    def pre_pair(self, companies: Iterable[str] | None = None) -> None:
        """Give simulator companies a paired device on the shared server (server_dir/<company>/),
        as if their QR codes had been scanned long ago: any host can restore them."""
        paired_at = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        for n, cid in enumerate(self.companies if companies is None else companies):
            device = SimulatorDevice(jid=f"55119{n:08d}:1@s.whatsapp.net", push_name=cid)
            (self.server_dir / cid).mkdir(mode=0o700, parents=True, exist_ok=True)
            fd = os.open(self.server_dir / cid / SIMULATOR_FILE, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(simulator_store_bytes(device, paired_at))

    def host(self, host_id: str) -> ClusterHost:
        return next(h for h in self.hosts if h.host_id == host_id)

    def start(self, timeout: float = 60.0) -> Cluster:
        """Start every host at once (a cold start) and wait until each answers."""
        at_once([functools.partial(h.start, wait=False) for h in self.hosts])
        for host in self.hosts:
            host.wait_ready(timeout)
        return self

    def restart(self, host: ClusterHost, timeout: float = 60.0) -> None:
        host.start(wait=True, timeout=timeout)

    def stop(self) -> None:
        """SIGTERM every running host (thawed first); SIGKILL the tree of any that lingers."""
        for host in self.hosts:
            if host.running():
                host.thaw()
        for host in self.hosts:
            if host.running():
                try:
                    host.stop(30)
                except RuntimeError:
                    pass
            host.kill()
        if self._db is not None:
            self._db.close()
            self._db = None

    def __enter__(self) -> Cluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def db(self) -> Any:
        import psycopg

        if self._db is None or self._db.closed:
            self._db = psycopg.connect(self.dsn, autocommit=True)
        return self._db

    def leases(self) -> dict[str, Lease]:
        return read_leases(self.db)

    @property
    def every_company(self) -> list[str]:
        return self.companies + list(self.neonize)

    def owned_by(self, host_id: str) -> dict[str, int]:
        """company -> token of the live leases host_id holds now."""
        return {c: lease.token for c, lease in self.leases().items()
                if lease.owner == host_id and lease.live and lease.token is not None}

    def workers(self) -> list[WorkerProc]:
        table = ProcessTable()
        return [w for host in self.hosts for w in host.workers(table)]

    def running_on(self) -> dict[str, set[str]]:
        """company -> hosts where a non-frozen worker for it is alive now."""
        out: dict[str, set[str]] = {}
        for w in self.workers():
            if not w.frozen:
                out.setdefault(w.company, set()).add(w.host)
        return out

    def snapshots(self, host: ClusterHost) -> dict[str, dict[str, Any]]:
        """GET /v1/companies on host ({} if it does not answer)."""
        try:
            return host.companies()
        except Exception:  # noqa: BLE001 (a host being killed or frozen answers nothing)
            return {}

    def state_on_owner(self, company: str) -> tuple[str | None, str | None]:
        """(owner host id, the company's state there) by the lease table and the owner's API."""
        lease = self.leases().get(company)
        if lease is None or lease.owner is None or not lease.live:
            return None, None
        host = self.host(lease.owner)
        return lease.owner, self.snapshots(host).get(company, {}).get("state")

    def wait_owned(self, companies: Iterable[str] | None = None, timeout: float = 60.0,
                   working: Iterable[str] = (), states: tuple[str, ...] = ()) -> dict[str, Lease]:
        """Wait until every company has a live lease; those in `working` also a live worker on
        the owner (and, with states, one of those states on the owner's API). The leases then."""
        wanted = list(self.every_company if companies is None else companies)
        busy = set(working)

        def done() -> dict[str, Lease] | None:
            leases, running = self.leases(), self.running_on()
            for cid in wanted:
                lease = leases.get(cid)
                if lease is None or not lease.live or lease.owner is None:
                    return None
                if cid in busy and lease.owner not in running.get(cid, set()):
                    return None
            if states and busy:
                snaps = {h.host_id: self.snapshots(h) for h in self.hosts if h.running()}
                for cid in busy & set(wanted):
                    owner = leases[cid].owner
                    if owner not in snaps or snaps[owner].get(cid, {}).get("state") not in states:
                        return None
            return leases

        result: dict[str, Lease] = wait_until(done, timeout, interval=0.1, what=f"{len(wanted)} companies owned")
        return result


# ----------------------------------------------------------------------------- the checker


def server_connections(server_dir: Path) -> Callable[[], dict[str, int]] | None:
    """company -> live connections on the shared simulator server (whatsappd.testing.simserver),
    or None when this build has no shared server. Imported when called: simserver reads the
    simulator's own modules, which no module of the supervisor side imports (tests/test_layout.py)."""
    try:
        simserver = importlib.import_module("whatsappd.testing.simserver")
    except ImportError:
        return None
    live: Callable[[Path], Mapping[str, list[Any]]] = simserver.live
    return lambda: {company: len(conns) for company, conns in live(server_dir).items()}



@dataclass(frozen=True)
class Violation:
    """A sample that broke the rule: kind is "two_hosts", "two_connections" or "token_down"."""

    at: float  # time.monotonic()
    company: str
    kind: str
    detail: str


@dataclass
class Sample:
    """What one 100 ms sample saw (kept only as counts, to stay small over minutes)."""

    at: float
    workers: int
    frozen: int
    connections: int
    leases: int


@dataclass
class Checker:
    """Samples the cluster every `interval` seconds from outside it; see the module doc."""

    cluster: Cluster
    connections: Callable[[], Mapping[str, int]] | None = None  # company -> live server connections
    interval: float = 0.1
    violations: list[Violation] = field(default_factory=list)
    samples: list[Sample] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.connections is None:
            self.connections = server_connections(self.cluster.server_dir)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="double-owner-checker", daemon=True)
        self._tokens: dict[str, int] = {}
        self._cache: dict[tuple[int, int], str | None] = {}
        self._db: Any = None

    def start(self) -> Checker:
        self._thread.start()
        return self

    def stop(self) -> Checker:
        self._stop.set()
        self._thread.join(10)
        if self._db is not None:
            self._db.close()
        return self

    def __enter__(self) -> Checker:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _run(self) -> None:
        import psycopg

        while not self._stop.is_set():
            began = time.monotonic()
            try:
                if self._db is None or self._db.closed:
                    self._db = psycopg.connect(self.cluster.dsn, autocommit=True)
                self.sample_once(self._db)
            except Exception as exc:  # noqa: BLE001 (recorded; the checker keeps sampling)
                self.errors.append(f"{type(exc).__name__}: {exc}")
                if self._db is not None:
                    self._db.close()
                    self._db = None
            self._stop.wait(max(0.0, self.interval - (time.monotonic() - began)))

    def sample_once(self, db: Any) -> Sample:
        """One sample; violations found are appended."""
        now = time.monotonic()
        table = ProcessTable()
        workers = [w for host in self.cluster.hosts for w in host.workers(table, self._cache)]
        acting: dict[str, set[str]] = {}
        for w in workers:
            if not w.frozen:
                acting.setdefault(w.company, set()).add(w.host)
        for company, hosts in acting.items():
            if len(hosts) > 1:
                pids = sorted((w.host, w.pid) for w in workers if w.company == company and not w.frozen)
                self.violations.append(Violation(now, company, "two_hosts", f"live workers {pids}"))
        connections = dict(self.connections()) if self.connections is not None else {}
        for company, count in connections.items():
            if count > 1:
                self.violations.append(Violation(now, company, "two_connections", f"{count} live connections"))
        leases = read_leases(db)
        for company, lease in leases.items():
            if lease.token is None:
                continue
            last = self._tokens.get(company)
            if last is not None and lease.token < last:
                self.violations.append(Violation(now, company, "token_down", f"token {last} -> {lease.token}"))
            self._tokens[company] = max(lease.token, last or 0)
        sample = Sample(now, sum(not w.frozen for w in workers), sum(w.frozen for w in workers),
                        sum(connections.values()), sum(lease.live for lease in leases.values()))
        self.samples.append(sample)
        return sample

    def double_owner_samples(self) -> int:
        """Distinct sample times with at least one double owner (two hosts or two connections)."""
        return len({v.at for v in self.violations if v.kind in ("two_hosts", "two_connections")})


# ----------------------------------------------------------------------------- scenarios
# The acceptance scenarios, each once: tests/test_cluster_acceptance.py runs them scaled down,
# bench/bench_cluster.py repeats them and prints the figures.


def pair_all(cluster: Cluster, companies: Iterable[str], timeout: float = 60.0) -> None:
    """Pair each simulator company on the host that owns it (QR, then the simulated scan)."""
    for cid in companies:
        leases = cluster.wait_owned([cid], timeout)
        owner = leases[cid].owner
        assert owner is not None
        cluster.host(owner).pair(cid, timeout=timeout)


@dataclass
class Failover:
    """One kill -9 of a host: what it owned (company -> token) and when each company ran elsewhere."""

    victim: str
    before: dict[str, int]
    after: dict[str, tuple[str, int]] = field(default_factory=dict)  # company -> (new owner, token)
    seconds: float = 0.0  # from the kill until the last of them ran elsewhere


def moved(cluster: Cluster, before: Mapping[str, int], victim: str, connected: Iterable[str] = ()
          ) -> dict[str, tuple[str, int]] | None:
    """company -> (owner, token) if every company of `before` is now owned by another host with a
    higher token, and the `connected` ones run a live worker there that the owner's API reports
    connected; None while any is not."""
    leases, running = cluster.leases(), cluster.running_on()
    must_connect = set(connected) & set(before)
    out: dict[str, tuple[str, int]] = {}
    for cid, token in before.items():
        lease = leases.get(cid)
        if lease is None or not lease.live or lease.owner in (None, victim) or lease.token is None or lease.token <= token:
            return None
        if cid in must_connect and lease.owner not in running.get(cid, set()):
            return None
        out[cid] = (lease.owner, lease.token)
    for owner in {out[cid][0] for cid in must_connect}:
        snaps = cluster.snapshots(cluster.host(owner))
        if any(snaps.get(cid, {}).get("state") != "connected" for cid in must_connect if out[cid][0] == owner):
            return None
    return out


def kill_and_failover(cluster: Cluster, victim: ClusterHost, connected: Iterable[str] = (),
                      timeout: float = 120.0) -> Failover:
    """SIGKILL victim's whole tree; wait until each company it owned runs on another host with a
    higher token (the `connected` ones connected there). The victim stays dead."""
    before = cluster.owned_by(victim.host_id)
    result = Failover(victim.host_id, before)
    began = time.monotonic()
    victim.kill()
    wanted = list(connected)
    result.after = wait_until(lambda: moved(cluster, before, victim.host_id, wanted), timeout, interval=0.05,
                              what=f"{victim.host_id}'s companies to run elsewhere")
    result.seconds = time.monotonic() - began
    return result


def wait_balanced(cluster: Cluster, connected: Iterable[str] = (), timeout: float = 120.0) -> dict[str, Lease]:
    """Wait until every company is owned and running, every running host owns at least one, and
    the `connected` ones are connected on their owners."""
    running = [h.host_id for h in cluster.hosts if h.running()]
    wanted = set(connected)

    def balanced() -> dict[str, Lease] | None:
        leases = cluster.wait_owned(timeout=timeout, working=wanted)
        owners = {lease.owner for lease in leases.values()}
        if len(cluster.every_company) >= len(running) and not set(running) <= owners:
            return None
        for host in cluster.hosts:
            if not host.running():
                continue
            snaps = cluster.snapshots(host)
            if any(snaps.get(c, {}).get("state") != "connected" for c in wanted if leases[c].owner == host.host_id):
                return None
        return leases

    result: dict[str, Lease] = wait_until(balanced, timeout, interval=0.2, what="the cluster to balance")
    return result


@dataclass
class Freeze:
    """One SIGSTOP of a host for `seconds`, then SIGCONT."""

    victim: str
    before: dict[str, int]
    taken: int = 0  # of its companies, how many another host took while it was frozen
    fenced_after: float = 0.0  # from SIGCONT until none of its old workers was alive


def freeze_and_thaw(cluster: Cluster, victim: ClusterHost, seconds: float, timeout: float = 60.0) -> Freeze:
    """SIGSTOP victim's tree for `seconds`, SIGCONT it, and wait until its old workers of
    companies another host took are gone."""
    before = cluster.owned_by(victim.host_id)
    old = {w.pid: w.company for w in cluster.workers() if w.host == victim.host_id}
    victim.freeze()
    time.sleep(seconds)
    leases = cluster.leases()
    taken = {cid for cid in before if leases.get(cid, Lease(None, None, False)).owner not in (None, victim.host_id)}
    thawed = time.monotonic()
    victim.thaw()

    def fenced() -> bool:
        table = ProcessTable()
        return not any(table.alive(pid) for pid, cid in old.items() if cid in taken)

    wait_until(fenced, timeout, interval=0.01, what=f"{victim.host_id}'s stale workers to exit")
    return Freeze(victim.host_id, before, len(taken), time.monotonic() - thawed)


def quarantined(cluster: Cluster) -> set[str]:
    """Companies any host reports store_unusable (quarantined) for, by its API or its log, or
    whose whatsmeow device mapping was moved to quarantine in PostgreSQL."""
    import psycopg

    out: set[str] = set()
    try:
        rows = cluster.db.execute("SELECT company FROM whatsappd_devices_quarantine").fetchall()
        out.update(str(row[0]) for row in rows)
    except psycopg.errors.UndefinedTable:
        pass
    for host in cluster.hosts:
        for cid, snap in cluster.snapshots(host).items():
            if (snap.get("last_error") or {}).get("code") == "store_unusable" or snap.get("state") == "store_unusable":
                out.add(cid)
        for line in host.log_since():
            text = str(line)
            if "store_unusable" in text or "quarantine" in str(line.get("event", "")):
                out.add(str(line.get("company", "?")))
    return out


def statuses(dsn: str) -> dict[str, int]:
    """Outbox messages by status, and failed ones by error code ("failed:send_interrupted")."""
    import psycopg

    with psycopg.connect(dsn) as db:
        rows = db.execute("SELECT status, coalesce(error_code, ''), count(*) FROM whatsappd_messages "
                          "GROUP BY 1, 2").fetchall()
    out: dict[str, int] = {}
    for status, code, count in rows:
        out[status] = out.get(status, 0) + int(count)
        if code:
            out[f"{status}:{code}"] = int(count)
    return out


@dataclass
class MidSend:
    """Messages queued across companies while their owners were killed mid-send."""

    queued: int
    sent: int = 0  # unique messages the shared server received
    duplicates: int = 0  # sends of a message the server had already received (duplicate requests + repeats)
    interrupted: int = 0  # failed with send_interrupted
    kills: list[str] = field(default_factory=list)
    sent_at_kills: list[int] = field(default_factory=list)  # unique sends on the server as each kill began
    statuses: dict[str, int] = field(default_factory=dict)


def server_sends(server_dir: Path) -> tuple[int, int]:
    """(unique sends, duplicates) on the shared simulator server: a message id logged twice, or
    a send refused as a repeat (the duplicates file), is a duplicate."""
    simserver = importlib.import_module("whatsappd.testing.simserver")
    unique = duplicates = 0
    for company in simserver.companies(server_dir):
        stats = simserver.send_stats(server_dir).get(company)
        if stats is None:
            continue
        unique += stats.sent
        duplicates += stats.duplicate_requests
    return unique, duplicates


def _sent_at_least(server_dir: Path, goal: int) -> bool:
    return server_sends(server_dir)[0] >= goal


def send_and_kill(cluster: Cluster, companies: list[str], messages: int, kills: int = 2,
                  timeout: float = 180.0) -> MidSend:
    """Queue `messages` over `companies` while they are held offline (simulated drop), let them
    send, SIGKILL the owner of the most of them each time another share of the messages went
    out (`kills` times), restart the killed hosts, wait until nothing is queued or sending, and
    count what the shared server received."""
    from whatsappd.testing.events import ApiSession

    leases = wait_balanced(cluster, companies, timeout)
    for cid in companies:
        host = cluster.host(str(leases[cid].owner))
        assert host.simulate(cid, "drop").status == 200
        host.wait_state(cid, "reconnecting", timeout=30)
    for i, cid in enumerate(companies):
        host = cluster.host(str(leases[cid].owner))
        share = messages // len(companies) + (1 if i < messages % len(companies) else 0)
        with ApiSession(str(host.socket_path)) as api:
            for n in range(share):
                response = api.post(f"/v1/companies/{cid}/messages", {"to": "+55 11 99999-0001", "text": f"{cid} m{n}"},
                                    headers={"Idempotency-Key": f"{cid}-{n}"})
                assert response.status == 202, response.body
    result = MidSend(messages)
    for cid in companies:
        assert cluster.host(str(leases[cid].owner)).simulate(cid, "restore").status == 200
    killed: list[ClusterHost] = []
    for k in range(kills):
        goal = messages * (k + 1) // (kills + 2)
        wait_until(functools.partial(_sent_at_least, cluster.server_dir, goal), timeout, interval=0.01,
                   what=f"{goal} messages to go out")
        owners = [lease.owner for cid, lease in cluster.leases().items() if cid in companies and lease.live]
        victim = cluster.host(str(max(set(owners), key=owners.count)))
        result.sent_at_kills.append(server_sends(cluster.server_dir)[0])
        kill_and_failover(cluster, victim, connected=companies, timeout=timeout)
        result.kills.append(victim.host_id)
        killed.append(victim)
        if len(killed) == len(cluster.hosts) - 1 or k == kills - 1:
            for host in killed:
                cluster.restart(host)
            killed.clear()

    def settled() -> dict[str, int] | None:
        now = statuses(cluster.dsn)
        return None if now.get("queued", 0) or now.get("sending", 0) else now

    result.statuses = wait_until(settled, timeout, interval=0.2, what="every message to be settled")
    result.sent, result.duplicates = server_sends(cluster.server_dir)
    result.interrupted = result.statuses.get("failed:send_interrupted", 0)
    return result
