"""One company: its state, what the operator wants of it, and what each worker outcome means.

A runner holds two things a reader should keep apart: the company's `State` (states.py: what
clients see, changed only through `transition`, which checks the table and logs one line) and
its `Intent` (what is wanted: run, restart, rest, stop, removed). What happens on each worker
outcome (logged out, replaced, banned, crash, timeout...) is decided in one place,
`Runner._decide`, which returns a `Next` step. Each runner is its own asyncio task: an
exception in one company's runner marks that company `failed` and never reaches another.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import enum
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar

from whatsappd import sessions
from whatsappd.config import CompanyConfig, Config
from whatsappd.errors import ErrorCode, Failure
from whatsappd.ids import session_dir
from whatsappd.logs import get_logger
from whatsappd.protocol import (
    ConnectRequest,
    EventMessage,
    ExitCode,
    Paired,
    Qr,
    ServerTime,
    StateReport,
    WorkerState,
)
from whatsappd.states import FAULTED, LIVE, TERMINAL, TRANSITIONS, IllegalTransition, LastError, State, check_transition
from whatsappd.supervisor.backoff import Backoff, BackoffPolicy, RateLimiter
from whatsappd.supervisor.devices import Devices, Place
from whatsappd.supervisor.process import (
    Deadlines,
    Exit,
    Kill,
    Launch,
    WorkerProcess,
    WorkerSpec,
    prepare_launch,
    start_worker,
)
from whatsappd.timefmt import iso_or_none, parse_iso

__all__ = ["Host", "Intent", "Next", "Runner", "Step", "Wait", "backoff_policy"]

log = get_logger()

#: last_error's message for a recorded whatsmeow device whose row is gone (PostgreSQL place).
NOT_PAIRED_MESSAGE = ("no device of this company in the whatsmeow store (its recorded JID has no row: "
                      "unlinked or deleted); connect to pair again")
#: A ban without a known expiry is retried after this.
DEFAULT_BAN_SECONDS = 3600.0

_R = TypeVar("_R", StateReport, Qr)  # a worker report that may move the company's state


class Intent(enum.Enum):
    """What is wanted of the company's worker (the runner's second axis, beside its State)."""

    RUN = "run"  # keep a worker running; retry what fails
    RESTART = "restart"  # run; the current worker is being stopped to start afresh (its end is no outcome)
    REST = "rest"  # no worker: stopped by the daemon or a logout, or an outcome only an operator leaves
    STOP = "stop"  # the operator stopped it: a status call does not bring a stored session back
    REMOVED = "removed"  # deleted, or dropped by a reload: never to start again

    @property
    def wants_worker(self) -> bool:
        return self in (Intent.RUN, Intent.RESTART)


class Wait(enum.Enum):
    """What a runner without a worker is waiting for; stop() may simply cancel any of these."""

    RETRY = "retry"  # a backoff delay or a ban's expiry
    CONNECT_TOKEN = "connect_token"  # the global connect-rate limiter
    START_SLOT = "start_slot"  # a slot among the workers that may boot at once


class Step(enum.Enum):
    STOP = "stop"  # the loop ends: the company rests, or was stopped
    RETRY = "retry"  # start again at `Next.at` (a backoff, a ban's expiry)
    START_NOW = "start_now"  # start again at once (a restart, the server's forced reconnect)


@dataclass(frozen=True)
class Next:
    """What the runner does after a worker ended, and why (the reason of its next start)."""

    step: Step
    reason: str
    at: float | None = None  # wall clock, for RETRY


class Host(Protocol):
    """What a runner uses of its supervisor (core.Supervisor), and nothing more."""

    config: Config
    limiter: RateLimiter  # one connection attempt per token, for all companies
    start_slots: asyncio.Semaphore  # workers that may boot at once
    stopping: bool  # the daemon is shutting down: nothing starts any more
    launch: Launch
    on_change: Callable[[], None]
    cluster: bool  # [cluster] enabled: a company runs only where its lease is held (Runner.token)
    devices: Devices  # where sessions live: paired / wipe / quarantine (supervisor/devices.py)

    def publish(self, event: dict[str, Any], secret: dict[str, Any] | None = None) -> None: ...
    def fence_deadline(self, company: str) -> float | None: ...  # [cluster]: a new worker's dead-man deadline
    def desire(self, company: str, run: bool) -> None: ...  # [cluster]: the operator's run/stop, kept in the registry


def backoff_policy(config: Config) -> BackoffPolicy:
    return BackoffPolicy(initial_delay=config.reconnect_initial_delay, multiplier=config.reconnect_multiplier,
                         max_delay=config.reconnect_max_delay, stable_after=config.reconnect_stable_after)


class Runner:
    """One company: its configuration, state, intent, worker and reconnect policy."""

    def __init__(self, host: Host, config: CompanyConfig, source: str) -> None:
        self.sup = host
        self.config = config
        self.source = source  # "config", "runtime" or "discovered"
        self.state = State.STOPPED
        self.since = time.time()
        self.reason = "not started"
        self.jid: str | None = None
        self.push_name: str | None = None
        self.last_error: dict[str, Any] | None = None
        self.starts = 0  # worker processes started for this company
        self.qr: dict[str, Any] | None = None
        self.ban_until: float | None = None
        self.retry_at: float | None = None  # wall clock of the next attempt, when waiting
        self.backoff = Backoff(backoff_policy(host.config))
        self.crashes: collections.deque[float] = collections.deque()
        self.worker: WorkerProcess | None = None
        self.intent = Intent.REST
        self.waiting: Wait | None = None
        self._task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._changed = asyncio.Event()
        # Operator acts on one company (connect, stop, restart, logout, delete, put) run one at
        # a time: a connect arriving while a stop waits for its worker must not be undone by
        # that stop, and two deletes must not both remove it. See act().
        self._op_lock = asyncio.Lock()
        self.removal: dict[str, Any] | None = None  # the answer of the delete that removed it
        #: (the WhatsApp server's time, our clock then) as a worker last reported it; whatsappd doctor.
        self.server_clock: tuple[float, float] | None = None
        #: [cluster] The lease token held HERE for this company; None: this host does not own it.
        self.token: int | None = None

    @property
    def id(self) -> str:
        return self.config.id

    @property
    def session_dir(self) -> Path:
        return session_dir(self.sup.config.sessions_dir, self.id)

    def session_state(self) -> sessions.SessionState:
        """Paired, none or corrupt, from a cache (status calls ask often): supervisor/devices.py."""
        return self.sup.devices.state(self.id, self.config.engine)

    def has_session(self) -> bool:
        return self.session_state() is sessions.SessionState.PAIRED

    def reconfigure(self, config: CompanyConfig, source: str) -> bool:
        """Take a new [[companies]] table; True if the running worker must restart for it (its
        engine or proxy changed: a worker keeps what it was started with)."""
        old, self.config, self.source = self.config, config, source
        return self.worker is not None and (old.engine != config.engine or old.proxy != config.proxy)

    @property
    def restarts(self) -> int:
        """Worker starts after the first."""
        return max(0, self.starts - 1)

    @property
    def busy(self) -> bool:
        """An operator act (stop, restart, logout) is under way."""
        return self._op_lock.locked()

    @property
    def removed(self) -> bool:
        """Deleted or dropped by a reload: never to start again."""
        return self.intent is Intent.REMOVED

    @property
    def stopped_by_operator(self) -> bool:
        return self.intent is Intent.STOP

    def stand_down(self, intent: Intent = Intent.REST) -> None:
        """No worker is wanted any more. An operator's stop or a removal is never weakened."""
        if self.intent is Intent.REMOVED or (self.intent is Intent.STOP and intent is Intent.REST):
            return
        self.intent = intent
        if intent is Intent.STOP and self.sup.cluster:
            self.sup.desire(self.id, False)

    @property
    def owned(self) -> bool:
        """This host may run the company: always on a single host; in a cluster, while it holds the lease."""
        return not self.sup.cluster or self.token is not None

    def check_owner(self) -> None:
        """Raise NOT_OWNER unless this host owns the company (the act must run on its owner)."""
        if not self.owned:
            raise Failure(ErrorCode.NOT_OWNER, f"company {self.id!r} is owned by another host of the cluster "
                          "(or by none right now); acts on it run on its owner")

    def fence(self, reason: str) -> None:
        """[cluster] This host lost the company's lease: SIGKILL its worker now (no graceful stop:
        the lease may be another host's soon), clear the token, start nothing more."""
        self.token = None
        self.stand_down()
        self._wake.set()
        task = self._task
        if self.waiting is not None and task is not None:
            task.cancel()
        if self.worker is not None:
            self.worker.kill(Kill.LEASE_LOST)
        if task is not None and not task.done():
            task.add_done_callback(lambda _: self._rest_fenced(reason))
        else:
            self._rest_fenced(reason)

    def _rest_fenced(self, reason: str) -> None:
        if self.token is None and self.state not in TERMINAL:
            self.transition(State.STOPPED, reason)

    # ------------------------------------------------------------------------------- state

    def transition(self, new: State, reason: str, **extra: Any) -> None:
        old = self.state
        if new == old:
            self.reason = reason
            return
        check_transition(old, new)
        self.state, self.since, self.reason = new, time.time(), reason
        if new is not State.PAIRING:
            self.qr = None
        log.info("state changed", company=self.id, old=str(old), new=str(new), reason=reason, **extra)
        self.sup.publish({"type": "company.state", "company": self.id, "old": str(old), "new": str(new),
                          "reason": reason, **extra})
        self._changed.set()
        self._changed = asyncio.Event()
        self.sup.on_change()

    async def wait_for(self, predicate: Callable[[Runner], bool], timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while not predicate(self):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            try:
                await asyncio.wait_for(self._changed.wait(), remaining)
            except TimeoutError:
                return predicate(self)
        return True

    def note_not_paired(self) -> None:
        """Its recorded device has no row in the whatsmeow store: say so (nothing is started)."""
        self._error(LastError.NOT_PAIRED, NOT_PAIRED_MESSAGE)

    def _error(self, code: LastError, message: str) -> None:
        self.last_error = {"code": str(code), "message": message, "at": iso_or_none(time.time())}

    def snapshot(self) -> dict[str, Any]:
        waiting = self.retry_at is not None and self.worker is None
        return {
            "id": self.id,
            "name": self.config.name,
            "engine": self.config.engine,
            "source": self.source,
            "state": str(self.state),
            "since": iso_or_none(self.since),
            "reason": self.reason,
            "jid": self.jid,
            "push_name": self.push_name,
            "has_session": self.has_session(),
            "qr_available": self.qr is not None,
            "last_error": self.last_error,
            "reconnect": {
                "attempt": self.backoff.attempt,
                "next_retry_at": iso_or_none(self.retry_at) if waiting else None,
            },
            "banned_until": iso_or_none(self.ban_until) if self.state is State.BANNED else None,
            "worker": {"pid": self.worker.pid if self.worker else None, "restarts": self.restarts},
        }

    # ------------------------------------------------------------------------ operator acts

    @contextlib.asynccontextmanager
    async def exclusive(self) -> AsyncIterator[None]:
        """Hold this company for one operator act; acts queue here, first come first served."""
        async with self._op_lock:
            yield

    @contextlib.asynccontextmanager
    async def act(self) -> AsyncIterator[None]:
        """exclusive(), for an act on a company that must still exist once its turn comes: one
        that waited for a delete is answered company_not_found, as if it had come after it."""
        async with self.exclusive():
            if self.removed:
                raise Failure(ErrorCode.COMPANY_NOT_FOUND, f"company {self.id!r} was deleted meanwhile")
            self.check_owner()
            yield

    def start(self, reason: str) -> None:
        """Run the company (again): from any resting state, or retry now if waiting."""
        if not self.owned:  # [cluster] its owner runs it (a status call here asks this often: no log line)
            return
        if self.sup.stopping or self.removed:
            log.info("not starting", company=self.id, reason=reason,
                     why="the daemon is stopping" if self.sup.stopping else "the company was removed")
            return
        if self.intent is not Intent.RESTART:  # a restart under way keeps its mark until _decide
            self.intent = Intent.RUN
        if self._task is None or self._task.done():
            if self.state in FAULTED:
                self.crashes.clear()
                self.backoff.reset()
            # Now, not when the task first runs: the answer to the call that started it (a
            # status call restoring a session) must not still say `stopped`.
            self.transition(State.STARTING, reason)
            self._task = asyncio.get_running_loop().create_task(self._loop(reason), name=f"runner-{self.id}")
        else:
            self.retry_at = None
            self._wake.set()

    async def connect(self, reason: str) -> bool:
        """An operator's connect, after any stop or restart under way has finished: start it
        unless it already runs. True if it was started (or a waiting retry was brought forward)."""
        async with self.act():
            if self.intent.wants_worker and self.state in LIVE:
                return False
            if self.sup.cluster:
                self.sup.desire(self.id, True)
            self.start(reason)
            return True

    async def stop(self, reason: str, grace: float | None = None) -> None:
        async with self.act():
            await self.stop_unlocked(reason, grace)

    async def stop_unlocked(self, reason: str, grace: float | None = None, intent: Intent = Intent.REST) -> None:
        """stop() for a caller that already holds exclusive(); intent says for how long."""
        self.stand_down(intent)
        grace = self.sup.config.workers_stop_grace if grace is None else grace
        self._wake.set()
        if self.waiting is not None and self._task is not None:
            # Waiting for a backoff, the connect-rate limiter or a start slot: nothing to stop
            # but the wait itself (cancelling is safe there: no process exists yet).
            self._task.cancel()
        if self.worker is not None:
            await self.worker.stop(grace)
        if self._task is not None:
            await asyncio.wait({self._task}, timeout=grace + 5)
        if self.state not in TERMINAL:
            self.transition(State.STOPPED, reason)

    async def restart(self, reason: str) -> None:
        async with self.act():
            await self.restart_unlocked(reason)

    async def restart_unlocked(self, reason: str) -> None:
        """restart() for a caller that already holds exclusive()."""
        self.crashes.clear()
        self.backoff.reset()
        if self.worker is not None and self._task is not None and not self._task.done():
            self.intent = Intent.RESTART
            await self.worker.stop(self.sup.config.workers_stop_grace)
        self.start(reason)

    async def command(self, op: str, args: dict[str, Any], timeout: float = 30.0) -> dict[str, Any]:
        """Run one command in the company's worker; raises Failure (not_running, worker_timeout,
        worker_exited, or the worker's own refusal)."""
        self.check_owner()
        worker = self.worker
        if worker is None:
            raise Failure(ErrorCode.NOT_RUNNING, f"company {self.id!r} has no running worker (state "
                          f"{self.state}); connect it first")
        return await worker.call(op, args, timeout)

    async def logout(self) -> dict[str, Any]:
        """Unlink the device through the library when connected; otherwise wipe locally."""
        async with self.act():
            return await self.logout_unlocked()

    async def logout_unlocked(self) -> dict[str, Any]:
        """logout() for a caller that already holds exclusive()."""
        if self.state is State.CONNECTED and self.worker is not None:
            await self.command("logout", {})
            done = await self.wait_for(lambda r: r.state is State.LOGGED_OUT, 30)
            if done:
                return {"unlinked": True, "wiped": True, "state": str(self.state)}
        await self.stop_unlocked("logout requested")
        wiped = await self.sup.devices.wipe(self.id, self.config.engine)
        self.jid = self.push_name = None
        if self.state is not State.LOGGED_OUT:
            self.transition(State.LOGGED_OUT, "logged out locally (not connected)")
        return {"unlinked": False, "wiped": wiped, "state": str(self.state),
                "note": "not connected: the session was wiped here, but the phone may still list "
                        "this device under Linked devices; remove it there"}

    # ----------------------------------------------------------------------------- the loop

    async def _loop(self, reason: str) -> None:
        then = Next(Step.START_NOW, reason)
        try:
            while True:
                if then.at is not None:
                    await self._sleep_until(then.at)
                if not self.intent.wants_worker:
                    break
                self.retry_at = None
                self.transition(State.STARTING, then.reason)
                # The launcher first (a zygote's boot takes up to a second), then the token: the
                # connect rate paces dials, and a token spent late would crowd the next one.
                with self._waiting_for(Wait.CONNECT_TOKEN):
                    await prepare_launch(self.sup.launch, self.config.engine)
                    await self.sup.limiter.acquire()
                if not self.intent.wants_worker:
                    break
                problem = self._session_problem()
                then = self._fail(LastError.SESSION_PERMISSIONS, problem) if problem else \
                    await self._decide(await self._run_worker())
                if then.step is Step.STOP:
                    break
        except asyncio.CancelledError:
            if self.intent.wants_worker:
                raise
            # stop() cancelled a wait: a normal end.
        except Exception as exc:  # a bug here must stay in this company
            log.exception("runner failed", company=self.id)
            self.stand_down()
            self._error(LastError.INTERNAL_ERROR, f"supervisor error: {exc}")
            if self.state is not State.FAILED:
                self.transition(State.FAILED, "internal error in the supervisor; see the log")
        finally:
            if not self.intent.wants_worker:
                self.retry_at = None
            if self.worker is not None:
                self.worker.kill(Kill.RUNNER_ENDED)
                self.worker = None

    @contextlib.contextmanager
    def _waiting_for(self, what: Wait) -> Iterator[None]:
        self.waiting = what
        try:
            yield
        finally:
            self.waiting = None

    async def _sleep_until(self, wall: float) -> None:
        self._wake.clear()
        with self._waiting_for(Wait.RETRY), contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake.wait(), max(0.0, wall - time.time()))

    def _rest(self, state: State, code: LastError, message: str, reason: str) -> Next:
        """End up in a resting state that only an operator (or a ban's expiry) leaves."""
        self.stand_down()
        self._error(code, message)
        self.transition(state, reason)
        return Next(Step.STOP, reason)

    def _fail(self, code: LastError, message: str) -> Next:
        return self._rest(State.FAILED, code, message, message)

    def _retry_later(self, code: LastError, message: str) -> Next:
        self._error(code, message)
        delay = self.backoff.next_delay()
        self.retry_at = time.time() + delay
        self.transition(State.RECONNECTING, message, attempt=self.backoff.attempt,
                        retry_in_seconds=round(delay, 3))
        return Next(Step.RETRY, f"retry after {code}", self.retry_at)

    async def _decide(self, end: Exit) -> Next:
        """What a worker's end means for the company, and what the runner does next."""
        code, killed = end.code, end.kill_reason
        if self.intent is Intent.RESTART:
            # The next worker start counts the restart (_run_worker); counting it here too
            # showed one restart request as two.
            self.intent = Intent.RUN
            return Next(Step.START_NOW, "restart requested")
        if not self.intent.wants_worker:
            return Next(Step.STOP, "stopped")
        if killed == Kill.LEASE_LOST:  # [cluster] lost, then acquired again while it died
            return Next(Step.START_NOW, "lease acquired again")
        cfg = self.sup.config
        if killed == Kill.PAIRING_TIMEOUT or code == ExitCode.PAIRING_TIMEOUT:
            return self._rest(State.STOPPED, LastError.QR_TIMEOUT,
                              "nobody scanned the QR code in time; connect again to get a new one",
                              "pairing timed out")
        if killed == Kill.PAIRED_WITHOUT_CONNECT:
            return Next(Step.START_NOW, "paired; restarting for the server's forced reconnect")
        if killed == Kill.CONNECT_TIMEOUT:
            return self._retry_later(LastError.CONNECT_TIMEOUT,
                                     f"no connection within {cfg.reconnect_connect_timeout:g}s")
        if killed == Kill.KEEPALIVE:
            return self._retry_later(LastError.KEEPALIVE,
                                     f"reconnecting for over {cfg.workers_stuck_reconnecting_after:g}s")
        if code in (ExitCode.TRANSIENT, ExitCode.STOPPED):
            return self._retry_later(LastError.CONNECTION_FAILED, "connection failed")
        if code == ExitCode.FENCED:  # [cluster] its dead-man deadline passed; the lease decides what follows
            return self._retry_later(LastError.CONNECTION_FAILED, "the worker's fence deadline passed")
        if code in (ExitCode.LOGGED_OUT, ExitCode.SESSION_DELETED):
            # The credentials are gone (unlinked by the phone, or their files deleted under the
            # worker, which then ended at once): wipe what is left, so no half session remains.
            await self.sup.devices.wipe(self.id, self.config.engine)
            self.jid = self.push_name = None
            if code == ExitCode.SESSION_DELETED:
                return self._rest(State.LOGGED_OUT, LastError.SESSION_DELETED,
                                  "the session's files were deleted while it ran; connect to pair again",
                                  "session_deleted")
            return self._rest(State.LOGGED_OUT, LastError.LOGGED_OUT,
                              "the phone unlinked this device; the session was wiped. Connect to pair again",
                              "logged out from the phone; session wiped")
        if code == ExitCode.REPLACED:
            return self._rest(State.REPLACED, LastError.REPLACED,
                              "another client took over these credentials; connect to take them back",
                              "stream replaced by another client")
        if code == ExitCode.BANNED:
            until = self.ban_until or time.time() + DEFAULT_BAN_SECONDS
            self.ban_until = until
            self.retry_at = until
            self._error(LastError.BANNED, f"temporarily banned until {iso_or_none(until)}; retried then")
            self.transition(State.BANNED, f"temporary ban until {iso_or_none(until)}")
            return Next(Step.RETRY, "ban expired", until)
        if code == ExitCode.OUTDATED:
            return self._rest(State.OUTDATED, LastError.OUTDATED,
                              "WhatsApp refuses this client version; upgrade whatsappd", "client outdated")
        if code == ExitCode.NOT_PAIRED:
            await self.sup.devices.refresh(self.id, self.config.engine)
            return self._rest(State.STOPPED, LastError.NOT_PAIRED, NOT_PAIRED_MESSAGE, "not paired")
        if code == ExitCode.STORE_UNUSABLE:
            moved = await self.sup.devices.quarantine(self.id, self.config.engine, "store_unusable")
            return self._fail(LastError.STORE_UNUSABLE, f"the session store cannot be opened; moved to {moved}; "
                              "connect to pair again")
        if code == ExitCode.SESSION_LOCKED:
            return self._fail(LastError.SESSION_LOCKED, "another process (another whatsappd on this state "
                              "directory?) is using this session; stop it, then connect")
        if code == ExitCode.BAD_INVOCATION:
            return self._fail(LastError.BAD_INVOCATION, "the worker refused its arguments (a bug); see the log")
        # Anything else is a crash: killed for silence, a signal, or an unexpected exit status.
        now = time.monotonic()
        self.crashes.append(now)
        window = cfg.workers_crash_window
        while self.crashes and now - self.crashes[0] > window:
            self.crashes.popleft()
        what = "stopped heart-beating" if killed == Kill.HEARTBEAT else (
            f"killed by signal {-code}" if code is not None and code < 0 else f"exited with status {code}")
        if len(self.crashes) >= cfg.workers_crash_limit:
            return self._fail(LastError.CRASH_LOOP, f"the worker crashed {len(self.crashes)} times within "
                              f"{window:g}s (last: {what}); connect or restart to try again")
        return self._retry_later(LastError.WORKER_CRASHED, f"worker {what}")

    def _session_problem(self) -> str | None:
        """Why the session directory cannot be used (made private), if it cannot."""
        try:
            sessions.ensure_root(self.sup.config.sessions_dir)
            sessions.fix_permissions(self.session_dir)
        except (sessions.SessionProblem, OSError) as exc:
            return str(exc)
        return None

    def _worker_spec(self, pair: bool) -> tuple[WorkerSpec, Deadlines]:
        cfg = self.sup.config
        devices, engine = self.sup.devices, self.config.engine
        in_pg = devices.place(engine) is Place.POSTGRESQL
        spec = WorkerSpec(company=self.id, session_dir=self.session_dir, engine=engine,
                          proxy=self.config.proxy, pair=pair, heartbeat_interval=cfg.workers_heartbeat_interval,
                          log_level=cfg.logging_level,
                          sim_server_dir=cfg.simulator_server_dir if self.config.engine == "simulator" else None,
                          fence_deadline=self.sup.fence_deadline(self.id),
                          whatsmeow_dsn=devices.whatsmeow_dsn if in_pg else None,
                          jid=None if pair else devices.jid(self.id, engine))
        deadlines = Deadlines(heartbeat=cfg.workers_heartbeat_timeout, connect=cfg.reconnect_connect_timeout,
                              pairing=cfg.workers_pairing_timeout, paired_connect=cfg.workers_paired_connect_timeout,
                              stuck_reconnecting=cfg.workers_stuck_reconnecting_after)
        return spec, deadlines

    async def _run_worker(self) -> Exit:
        # The device place may have changed under the cache (another host, an operator): read it
        # again, off the loop, before deciding between pairing and restoring.
        await self.sup.devices.refresh(self.id, self.config.engine)
        pair = not self.has_session()
        # A start slot bounds how many workers boot at once: each start costs a Python process
        # importing its engine, and a hundred at once would starve the event loop of CPU. The
        # worker holds it until it first speaks (or ends).
        with self._waiting_for(Wait.START_SLOT):
            await self.sup.start_slots.acquire()
        try:
            worker = await start_worker(*self._worker_spec(pair), launch=self.sup.launch)
        except BaseException:
            self.sup.start_slots.release()
            raise
        worker.until_booted(self.sup.start_slots.release)
        if not self.owned:
            # [cluster] The lease went while it was spawned (fence() found no worker to kill): not a
            # graceful stop, it could connect meanwhile, and another host may own the company now.
            worker.kill(Kill.LEASE_LOST)
        elif self.intent is not Intent.RUN:
            worker.ask_to_stop()  # stop() or restart() came while it was being spawned
        elif (deadline := self.sup.fence_deadline(self.id)) is not None:
            worker.fence(deadline)  # [cluster] a renewal during its spawn moved the deadline on
        self.starts += 1
        self.worker = worker
        log.info("worker started", company=self.id, pid=worker.pid, engine=self.config.engine,
                 mode="pairing" if pair else "restore")
        try:
            await self._serve(worker)
        except BaseException:
            worker.kill(Kill.SUPERVISOR_ERROR)  # never wait below for a worker nobody reads any more
            raise
        finally:
            end = await worker.close()
            self.worker = None
        log.info("worker exited", company=self.id, pid=worker.pid, exit_code=end.code, killed=end.kill_reason)
        return end

    async def _serve(self, worker: WorkerProcess) -> None:
        """Apply the worker's reports until it ends (the process object enforces its deadlines)."""
        async with contextlib.aclosing(worker.messages()) as messages:
            async for message in messages:
                match message:
                    case StateReport():
                        self._report(self._on_state, message, str(message.state))
                    case Qr():
                        self._report(self._on_qr, message, "qr")
                    case Paired(jid=jid):
                        if jid and self.sup.devices.place(self.config.engine) is Place.POSTGRESQL:
                            # Before anything else of the pairing: which device is this company's.
                            await self.sup.devices.record(self.id, jid)
                        self.jid = jid or self.jid
                        log.info("paired", company=self.id, jid=self.jid)
                        self.sup.publish({"type": "company.paired", "company": self.id, "jid": self.jid})
                    case EventMessage(event=event):
                        self.sup.publish({**event, "company": self.id})
                    case ServerTime(server_time=server, local_time=local):
                        self.server_clock = (server, local)
                    case ConnectRequest():
                        # One more connection attempt of a live worker (the library's reconnect): a
                        # token from the same limiter, in the same first-come queue, as every start.
                        worker.grant_connect(self.sup.limiter.acquire)
                    # hello and heartbeat only prove it alive (the process object noted that);
                    # an unknown type is a newer worker's: ignored.

    def _report(self, handler: Callable[[_R], None], message: _R, what: str) -> None:
        """Apply a worker's report, unless the company is being stopped: a late report from a
        worker on its way out must not move a stopped company (nor break the reading loop)."""
        if not self.intent.wants_worker:
            return
        try:
            handler(message)
        except IllegalTransition:
            log.exception("ignored a worker report that does not fit the state", company=self.id,
                          state=str(self.state), report=what)

    def _on_state(self, report: StateReport) -> None:
        reason = report.reason or "reported by the worker"
        match report.state:
            case WorkerState.CONNECTING if State.CONNECTING in TRANSITIONS[self.state]:
                self.transition(State.CONNECTING, reason)
            case WorkerState.PAIRING if self.state is not State.PAIRING:
                self.transition(State.PAIRING, "waiting for a QR scan or phone code")
            case WorkerState.CONNECTED:
                self.jid = report.jid or self.jid
                self.push_name = report.push_name or self.push_name
                self.backoff.connected()
                self.last_error = None
                self.ban_until = None
                self.transition(State.CONNECTED, "connected", jid=self.jid)
            case WorkerState.RECONNECTING if self.state is not State.RECONNECTING:
                self.transition(State.RECONNECTING, reason)
            case WorkerState.BANNED:
                self.ban_until = parse_iso(report.until)

    def _on_qr(self, message: Qr) -> None:
        self.qr = {"code": message.code, "expires_at": message.expires_at}
        if self.state is not State.PAIRING:
            self.transition(State.PAIRING, "waiting for a QR scan or phone code")
        # The code itself goes only to live listeners (never to disk or the log).
        self.sup.publish({"type": "company.pairing", "company": self.id,
                          "expires_at": self.qr["expires_at"]}, secret={"code": self.qr["code"]})
