"""The supervisor: one runner per company, each owning one worker process and one state.

What happens on each worker outcome (logged out, replaced, banned, crash, timeout...) is
decided in one place, `Runner._decide`. Each runner is its own asyncio task: an exception in
one company's runner marks that company `failed` and never reaches another company.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import os
import signal
import socket
import sys
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from whatsappd import sessions
from whatsappd.config import CompanyConfig, Config, ConfigDiff
from whatsappd.errors import ApiError, ErrorCode, Failure
from whatsappd.ids import session_dir
from whatsappd.logs import current_format, get_logger
from whatsappd.protocol import MAX_LINE, ExitCode, decode, encode
from whatsappd.states import IllegalTransition, State, check_transition
from whatsappd.supervisor.backoff import Backoff, BackoffPolicy, RateLimiter
from whatsappd.supervisor.registry import RuntimeRegistry
from whatsappd.systemd import scrub_environment
from whatsappd.timefmt import iso_or_none, parse_iso

__all__ = ["Runner", "Supervisor"]

log = get_logger()

#: Workers that may be booting (spawned, not yet heard from) at once.
MAX_BOOTING_WORKERS = 8
#: A ban without a known expiry is retried after this.
DEFAULT_BAN_SECONDS = 3600.0


@dataclass
class _Outcome:
    code: int | None  # the worker's exit status (negative: killed by that signal)
    kill_reason: str | None  # why we killed it, if we did


class _Worker:
    """A running worker process and its channel."""

    def __init__(self, proc: asyncio.subprocess.Process, reader: asyncio.StreamReader,
                 writer: asyncio.StreamWriter) -> None:
        self.proc = proc
        self.reader = reader
        self.writer = writer
        self.kill_reason: str | None = None
        self.booted = False  # has said anything yet (holds a start slot until then)
        self.pending: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self.next_id = 1
        # A reconnect attempt the worker asked a token for (connect_request), and the seconds
        # its reconnects spent waiting for tokens since it last lost its connection.
        self.grant: asyncio.Task[None] | None = None
        self.paced = 0.0

    @property
    def waiting_for_grant(self) -> bool:
        return self.grant is not None and not self.grant.done()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def send(self, message: dict[str, Any]) -> None:
        if not self.writer.is_closing():
            self.writer.write(encode(message))

    def kill(self, reason: str) -> None:
        if self.proc.returncode is None:
            self.kill_reason = self.kill_reason or reason
            try:
                self.proc.send_signal(signal.SIGKILL)
            except ProcessLookupError:
                pass

    async def stop(self, grace: float) -> None:
        """Ask the worker to disconnect; SIGKILL it if it is still there after grace seconds."""
        self.send({"type": "stop"})
        try:
            await asyncio.wait_for(asyncio.shield(self.proc.wait()), grace)
        except TimeoutError:
            log.warning("worker did not stop in time; killing it", pid=self.pid, grace_seconds=grace)
            self.kill("stop_grace_exceeded")
            await self.proc.wait()


class Runner:
    """One company: its configuration, state, worker and reconnect policy."""

    def __init__(self, supervisor: Supervisor, config: CompanyConfig, source: str) -> None:
        self.sup = supervisor
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
        self.backoff = Backoff(supervisor.backoff_policy)
        self.crashes: collections.deque[float] = collections.deque()
        self.worker: _Worker | None = None
        self.want_running = False
        self.stopped_by_operator = False
        self._task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._changed = asyncio.Event()
        self._restart_now = False
        self._waiting = False  # in a wait that stop() may simply cancel
        # Operator acts on one company (connect, stop, restart, logout, delete, put) run one at
        # a time: a connect arriving while a stop waits for its worker must not be undone by
        # that stop, and two deletes must not both remove it. See act().
        self._op_lock = asyncio.Lock()
        self._session_cache: tuple[tuple[int, int, int], str] | None = None
        self.removed = False  # deleted or dropped by a reload: never to start again
        self.removal: dict[str, Any] | None = None  # the answer of the delete that removed it

    @property
    def id(self) -> str:
        return self.config.id

    @property
    def session_dir(self) -> Path:
        return session_dir(self.sup.sessions_root, self.id)

    def session_state(self) -> str:
        """'paired', 'none' or 'corrupt', cached until the session's files change.

        Status calls ask this often; opening the store with SQLite each time would stall the
        event loop behind a busy store. A stat of the directory and the store file is cheap.
        """
        key = sessions.stamp(self.session_dir)
        if self._session_cache is None or self._session_cache[0] != key:
            self._session_cache = (key, sessions.session_state(self.session_dir))
        return self._session_cache[1]

    def has_session(self) -> bool:
        return self.session_state() == "paired"

    @property
    def restarts(self) -> int:
        """Worker starts after the first."""
        return max(0, self.starts - 1)

    @property
    def busy(self) -> bool:
        """An operator act (stop, restart, logout) is under way."""
        return self._op_lock.locked()

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

    def _error(self, code: str, message: str) -> None:
        self.last_error = {"code": code, "message": message, "at": iso_or_none(time.time())}

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
                raise ApiError(ErrorCode.COMPANY_NOT_FOUND, f"company {self.id!r} was deleted meanwhile")
            yield

    def start(self, reason: str) -> None:
        """Run the company (again): from any resting state, or retry now if waiting."""
        if self.sup.stopping or self.removed:
            log.info("not starting", company=self.id, reason=reason,
                     why="the daemon is stopping" if self.sup.stopping else "the company was removed")
            return
        self.stopped_by_operator = False
        self.want_running = True
        if self._task is None or self._task.done():
            if self.state in (State.FAILED, State.REPLACED, State.OUTDATED, State.LOGGED_OUT):
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
            if self.want_running and self.state in (State.CONNECTED, State.PAIRING, State.CONNECTING):
                return False
            self.start(reason)
            return True

    async def stop(self, reason: str, grace: float | None = None) -> None:
        async with self.act():
            await self.stop_unlocked(reason, grace)

    async def stop_unlocked(self, reason: str, grace: float | None = None) -> None:
        """stop() for a caller that already holds exclusive()."""
        self.want_running = False
        grace = self.sup.config.workers_stop_grace if grace is None else grace
        self._wake.set()
        if self._waiting and self._task is not None:
            # Waiting for a backoff, the connect-rate limiter or a start slot: nothing to stop
            # but the wait itself (cancelling is safe there: no process exists yet).
            self._task.cancel()
        if self.worker is not None:
            await self.worker.stop(grace)
        if self._task is not None:
            await asyncio.wait({self._task}, timeout=grace + 5)
        if self.state not in (State.STOPPED, State.LOGGED_OUT, State.REPLACED, State.OUTDATED, State.FAILED):
            self.transition(State.STOPPED, reason)

    async def restart(self, reason: str) -> None:
        async with self.act():
            await self.restart_unlocked(reason)

    async def restart_unlocked(self, reason: str) -> None:
        """restart() for a caller that already holds exclusive()."""
        self.crashes.clear()
        self.backoff.reset()
        if self.worker is not None and self._task is not None and not self._task.done():
            self._restart_now = True
            await self.worker.stop(self.sup.config.workers_stop_grace)
        self.start(reason)

    async def command(self, op: str, args: dict[str, Any], timeout: float = 30.0) -> dict[str, Any]:
        worker = self.worker
        if worker is None:
            raise ApiError(ErrorCode.NOT_RUNNING, f"company {self.id!r} has no running worker (state "
                           f"{self.state}); connect it first")
        request_id = worker.next_id
        worker.next_id += 1
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        worker.pending[request_id] = future
        worker.send({"type": "command", "id": request_id, "company": self.id, "op": op, "args": args})
        try:
            reply = await asyncio.wait_for(future, timeout)
        except TimeoutError:
            raise ApiError(ErrorCode.WORKER_TIMEOUT, f"the worker of {self.id!r} did not answer within "
                           f"{timeout:g}s") from None
        finally:
            worker.pending.pop(request_id, None)
        if not reply.get("ok"):
            error = reply.get("error") or {}
            raise Failure(ErrorCode.parse(error.get("code")), str(error.get("message", "failed")),
                          permanent=bool(error.get("permanent")))
        return dict(reply.get("result") or {})

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
        wiped = sessions.wipe(self.sup.sessions_root, self.id)
        self.jid = self.push_name = None
        if self.state is not State.LOGGED_OUT:
            self.transition(State.LOGGED_OUT, "logged out locally (not connected)")
        return {"unlinked": False, "wiped": wiped, "state": str(self.state),
                "note": "not connected: the session was wiped here, but the phone may still list "
                        "this device under Linked devices; remove it there"}

    # ----------------------------------------------------------------------------- the loop

    async def _loop(self, reason: str) -> None:
        try:
            while self.want_running:
                if self.retry_at is not None:
                    await self._sleep_until(self.retry_at)
                    if not self.want_running:
                        break
                self.retry_at = None
                self.transition(State.STARTING, reason)
                self._waiting = True
                try:
                    await self.sup.limiter.acquire()
                finally:
                    self._waiting = False
                if not self.want_running:
                    break
                outcome = await self._run_worker()
                reason = self._decide(outcome)
        except asyncio.CancelledError:
            if self.want_running:
                raise
            # stop() cancelled a wait: a normal end.
        except Exception as exc:  # a bug here must stay in this company
            log.exception("runner failed", company=self.id)
            self.want_running = False
            self._error("internal_error", f"supervisor error: {exc}")
            if self.state is not State.FAILED:
                self.transition(State.FAILED, "internal error in the supervisor; see the log")
        finally:
            self.retry_at = None if not self.want_running else self.retry_at
            if self.worker is not None:
                self.worker.kill("runner ended")
                self.worker = None

    async def _sleep_until(self, wall: float) -> None:
        self._wake.clear()
        delay = max(0.0, wall - time.time())
        self._waiting = True
        try:
            await asyncio.wait_for(self._wake.wait(), delay)
        except TimeoutError:
            pass
        finally:
            self._waiting = False

    def _rest(self, state: State, code: str, message: str, reason: str) -> str:
        """End up in a resting state that only an operator (or a ban's expiry) leaves."""
        self.want_running = False
        self._error(code, message)
        self.transition(state, reason)
        return "stopped"

    def _fail(self, code: str, message: str) -> str:
        return self._rest(State.FAILED, code, message, message)

    def _retry_later(self, code: str, message: str) -> str:
        self._error(code, message)
        delay = self.backoff.next_delay()
        self.retry_at = time.time() + delay
        self.transition(State.RECONNECTING, message, attempt=self.backoff.attempt,
                        retry_in_seconds=round(delay, 3))
        return f"retry after {code}"

    def _decide(self, outcome: _Outcome) -> str:
        """What a worker's end means for the company. Returns the reason of the next start."""
        code, killed = outcome.code, outcome.kill_reason
        if self._restart_now:
            # The next worker start counts the restart (_run_worker); counting it here too
            # showed one restart request as two.
            self._restart_now = False
            return "restart requested"
        if not self.want_running:
            return "stopped"
        if killed == "pairing_timeout" or code == ExitCode.PAIRING_TIMEOUT:
            return self._rest(State.STOPPED, "qr_timeout",
                              "nobody scanned the QR code in time; connect again to get a new one",
                              "pairing timed out")
        if killed == "paired_without_connect":
            return "paired; restarting for the server's forced reconnect"
        if killed in ("connect_timeout", "keepalive") or code in (ExitCode.TRANSIENT, ExitCode.STOPPED):
            message = {
                "connect_timeout": f"no connection within {self.sup.config.reconnect_connect_timeout:g}s",
                "keepalive": f"reconnecting for over {self.sup.config.workers_stuck_reconnecting_after:g}s",
            }.get(killed or "", "connection failed")
            return self._retry_later(killed or "connection_failed", message)
        if code in (ExitCode.LOGGED_OUT, ExitCode.SESSION_DELETED):
            # The credentials are gone (unlinked by the phone, or their files deleted under the
            # worker, which then ended at once): wipe what is left, so no half session remains.
            sessions.wipe(self.sup.sessions_root, self.id)
            self.jid = self.push_name = None
            if code == ExitCode.SESSION_DELETED:
                return self._rest(State.LOGGED_OUT, "session_deleted",
                                  "the session's files were deleted while it ran; connect to pair again",
                                  "session_deleted")
            return self._rest(State.LOGGED_OUT, "logged_out",
                              "the phone unlinked this device; the session was wiped. Connect to pair again",
                              "logged out from the phone; session wiped")
        if code == ExitCode.REPLACED:
            return self._rest(State.REPLACED, "replaced",
                              "another client took over these credentials; connect to take them back",
                              "stream replaced by another client")
        if code == ExitCode.BANNED:
            until = self.ban_until or time.time() + DEFAULT_BAN_SECONDS
            self.ban_until = until
            self.retry_at = until
            self._error("banned", f"temporarily banned until {iso_or_none(until)}; retried then")
            self.transition(State.BANNED, f"temporary ban until {iso_or_none(until)}")
            return "ban expired"
        if code == ExitCode.OUTDATED:
            return self._rest(State.OUTDATED, "outdated", "WhatsApp refuses this client version; upgrade whatsappd",
                              "client outdated")
        if code == ExitCode.STORE_UNUSABLE:
            moved = sessions.quarantine(self.sup.sessions_root, self.id)
            return self._fail("store_unusable", f"the session store cannot be opened; moved to {moved}; "
                              "connect to pair again")
        if code == ExitCode.SESSION_LOCKED:
            return self._fail("session_locked", "another process (another whatsappd on this state "
                              "directory?) is using this session; stop it, then connect")
        if code == ExitCode.BAD_INVOCATION:
            return self._fail("bad_invocation", "the worker refused its arguments (a bug); see the log")
        # Anything else is a crash: killed for silence, a signal, or an unexpected exit status.
        now = time.monotonic()
        self.crashes.append(now)
        window = self.sup.config.workers_crash_window
        while self.crashes and now - self.crashes[0] > window:
            self.crashes.popleft()
        what = "stopped heart-beating" if killed == "heartbeat" else (
            f"killed by signal {-code}" if code is not None and code < 0 else f"exited with status {code}")
        if len(self.crashes) >= self.sup.config.workers_crash_limit:
            return self._fail("crash_loop", f"the worker crashed {len(self.crashes)} times within "
                              f"{window:g}s (last: {what}); connect or restart to try again")
        return self._retry_later("worker_crashed", f"worker {what}")

    async def _spawn(self, pair: bool) -> _Worker:
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        cfg = self.sup.config
        args = [
            sys.executable, "-m", "whatsappd.worker",
            "--company", self.id, "--session-dir", str(self.session_dir), "--engine", self.config.engine,
            "--channel-fd", str(child.fileno()), "--parent-pid", str(os.getpid()),
            "--heartbeat", str(cfg.workers_heartbeat_interval),
            "--log-format", current_format(), "--log-level", cfg.logging_level,
        ]
        env = scrub_environment(os.environ)
        env.pop("WHATSAPPD_PROXY", None)  # only ever the company's own proxy
        if self.config.proxy:
            # In the environment, not argv: a proxy URL may carry credentials, and any local user
            # can read a process's argv, while its environment is the owner's alone.
            env["WHATSAPPD_PROXY"] = self.config.proxy
        if pair:
            args.append("--pair")
        try:
            # Its own session: Ctrl-C (SIGINT to the terminal's foreground process group) or a
            # terminal hangup reaches the daemon only, which then stops its workers in order. The
            # worker's parent-death signal still ends it if the daemon dies (even by kill -9).
            proc = await asyncio.create_subprocess_exec(
                *args, pass_fds=(child.fileno(),), env=env, start_new_session=True,
                stdin=asyncio.subprocess.DEVNULL, stdout=None, stderr=None,
            )
        finally:
            child.close()
        reader, writer = await asyncio.open_unix_connection(sock=parent, limit=MAX_LINE)
        return _Worker(proc, reader, writer)

    async def _run_worker(self) -> _Outcome:
        try:
            sessions.ensure_root(self.sup.sessions_root)
            sessions.fix_permissions(self.session_dir)
        except (sessions.SessionProblem, OSError) as exc:
            self._fail("session_permissions", str(exc))
            return _Outcome(None, None)
        pair = not self.has_session()
        # A start slot bounds how many workers boot at once: each start costs a Python process
        # importing its engine, and a hundred at once would starve the event loop of CPU.
        self._waiting = True
        try:
            await self.sup.start_slots.acquire()
        finally:
            self._waiting = False
        try:
            worker = await self._spawn(pair)
        except BaseException:
            self.sup.start_slots.release()
            raise
        if not self.want_running or self._restart_now:
            worker.send({"type": "stop"})  # stop() came while it was being spawned
        self.starts += 1
        self.worker = worker
        log.info("worker started", company=self.id, pid=worker.pid, engine=self.config.engine,
                 mode="pairing" if pair else "restore")
        try:
            await self._serve(worker)
        except BaseException:
            worker.kill("supervisor_error")  # never wait below for a worker nobody reads any more
            raise
        finally:
            if worker.grant is not None:
                worker.grant.cancel()  # a token granted but not yet handed over goes back
            if not worker.booted:
                self.sup.start_slots.release()
            code = await worker.proc.wait()
            worker.writer.close()
            for future in worker.pending.values():
                if not future.done():
                    future.set_result({"ok": False, "error": {"code": ErrorCode.WORKER_EXITED,
                                                              "message": "the worker exited"}})
            self.worker = None
        log.info("worker exited", company=self.id, pid=worker.pid, exit_code=code,
                 killed=worker.kill_reason)
        return _Outcome(code, worker.kill_reason)

    async def _serve(self, worker: _Worker) -> None:
        """Read the worker's messages until EOF, enforcing the deadlines."""
        cfg = self.sup.config
        started = time.monotonic()
        last_seen = started
        connect_deadline: float | None = started + cfg.reconnect_connect_timeout
        pairing_deadline: float | None = None
        paired_deadline: float | None = None
        reconnecting_since: float | None = None
        while True:
            now = time.monotonic()
            deadlines = {
                "heartbeat": last_seen + cfg.workers_heartbeat_timeout,
                "connect_timeout": connect_deadline,
                "pairing_timeout": pairing_deadline,
                "paired_without_connect": paired_deadline,
                "keepalive": self._stuck_deadline(worker, reconnecting_since),
            }
            name, due = min(((k, v) for k, v in deadlines.items() if v is not None), key=lambda kv: kv[1])
            if due <= now:
                if worker.kill_reason is None:
                    log.warning("killing worker", company=self.id, pid=worker.pid, reason=name)
                worker.kill(name)
                # Keep reading: EOF comes once the process is gone.
                due = now + 5.0
            try:
                # asyncio.timeout, not wait_for: no extra task per heartbeat (idle CPU).
                async with asyncio.timeout(max(0.0, due - now)):
                    line = await worker.reader.readline()
            except TimeoutError:
                continue
            except (ValueError, asyncio.LimitOverrunError):
                worker.kill("protocol_violation")
                continue
            except OSError:
                # Reset by a worker we killed while it had unread data: that is its end, and
                # _decide classifies the exit like any other.
                return
            if not line:
                return
            if not worker.booted:
                worker.booted = True  # it runs and speaks: its start slot is free for the next
                self.sup.start_slots.release()
            last_seen = time.monotonic()
            try:
                message = decode(line)
            except ValueError:
                log.error("bad message from worker; killing it", company=self.id, pid=worker.pid)
                worker.kill("protocol_violation")
                continue
            kind = message["type"]
            if kind == "state":
                state = message.get("state")
                if state in ("pairing", "connected", "banned"):
                    connect_deadline = None
                if state == "pairing" and pairing_deadline is None:
                    pairing_deadline = started + cfg.workers_pairing_timeout
                if state == "connected":
                    pairing_deadline = paired_deadline = reconnecting_since = None
                elif state == "reconnecting" and reconnecting_since is None:
                    reconnecting_since, worker.paced = time.monotonic(), 0.0
                self._report(self._on_state, message)
            elif kind == "qr":
                connect_deadline = None
                if pairing_deadline is None:
                    pairing_deadline = started + cfg.workers_pairing_timeout
                self._report(self._on_qr, message)
            elif kind == "paired":
                pairing_deadline = None
                paired_deadline = time.monotonic() + cfg.workers_paired_connect_timeout
                self.jid = message.get("jid") or self.jid
                log.info("paired", company=self.id, jid=self.jid)
                self.sup.publish({"type": "company.paired", "company": self.id, "jid": self.jid})
            elif kind == "reply":
                future = worker.pending.get(message.get("id"))  # type: ignore[arg-type]
                if future is not None and not future.done():
                    future.set_result(message)
            elif kind == "event":
                self.sup.publish({**message.get("event", {}), "company": self.id})
            elif kind == "connect_request" and not worker.waiting_for_grant:
                worker.grant = asyncio.get_running_loop().create_task(self._grant_connect(worker))

    async def _grant_connect(self, worker: _Worker) -> None:
        """A token for one more connection attempt of a live worker (the library's reconnect):
        from the same limiter, in the same first-come queue, as every worker start."""
        started = time.monotonic()
        try:
            await self.sup.limiter.acquire()
        finally:
            worker.paced += time.monotonic() - started
        worker.send({"type": "connect_grant"})

    def _stuck_deadline(self, worker: _Worker, reconnecting_since: float | None) -> float | None:
        """When a worker reconnecting in vain is killed (keepalive). Time its reconnects spent
        waiting for our own connect-rate limiter does not count: that is pacing, not being stuck."""
        if reconnecting_since is None or worker.waiting_for_grant:
            return None
        return reconnecting_since + worker.paced + self.sup.config.workers_stuck_reconnecting_after

    def _report(self, handler: Callable[[dict[str, Any]], None], message: dict[str, Any]) -> None:
        """Apply a worker's report, unless the company is being stopped: a late report from a
        worker on its way out must not move a stopped company (nor break the reading loop)."""
        if not self.want_running:
            return
        try:
            handler(message)
        except IllegalTransition:
            log.exception("ignored a worker report that does not fit the state", company=self.id,
                          state=str(self.state), report=message.get("state") or message.get("type"))

    def _on_state(self, message: dict[str, Any]) -> None:
        state, reason = message.get("state"), str(message.get("reason") or "reported by the worker")
        if state == "connecting" and self.state in (State.STARTING, State.RECONNECTING, State.PAIRING):
            self.transition(State.CONNECTING, reason)
        elif state == "pairing" and self.state is not State.PAIRING:
            self.transition(State.PAIRING, "waiting for a QR scan or phone code")
        elif state == "connected":
            self.jid = message.get("jid") or self.jid
            self.push_name = message.get("push_name") or self.push_name
            self.backoff.connected()
            self.last_error = None
            self.ban_until = None
            self.transition(State.CONNECTED, "connected", jid=self.jid)
        elif state == "reconnecting" and self.state is not State.RECONNECTING:
            self.transition(State.RECONNECTING, reason)
        elif state == "banned":
            self.ban_until = parse_iso(message.get("until"))

    def _on_qr(self, message: dict[str, Any]) -> None:
        self.qr = {"code": message.get("code"), "expires_at": message.get("expires_at")}
        if self.state is not State.PAIRING:
            self.transition(State.PAIRING, "waiting for a QR scan or phone code")
        # The code itself goes only to live listeners (never to disk or the log).
        self.sup.publish({"type": "company.pairing", "company": self.id,
                          "expires_at": self.qr["expires_at"]}, secret={"code": self.qr["code"]})


class Supervisor:
    def __init__(self, config: Config, on_change: Callable[[], None] = lambda: None) -> None:
        self.config = config
        self.on_change = on_change
        self.listeners: list[Callable[[dict[str, Any], dict[str, Any] | None], None]] = []
        self.limiter = RateLimiter(config.reconnect_connect_rate)
        self.start_slots = asyncio.Semaphore(MAX_BOOTING_WORKERS)
        self.registry = RuntimeRegistry(config.daemon_state_dir / "companies.json")
        self.companies: dict[str, Runner] = {}
        self.stopping = False  # set at shutdown: nothing starts any more
        for company in config.companies:
            self.companies[company.id] = Runner(self, company, "config")

    @property
    def sessions_root(self) -> Path:
        return self.config.sessions_dir

    @property
    def backoff_policy(self) -> BackoffPolicy:
        c = self.config
        return BackoffPolicy(initial_delay=c.reconnect_initial_delay, multiplier=c.reconnect_multiplier,
                             max_delay=c.reconnect_max_delay, stable_after=c.reconnect_stable_after)

    def publish(self, event: dict[str, Any], secret: dict[str, Any] | None = None) -> None:
        event = {"at": iso_or_none(time.time()), **event}
        for listener in list(self.listeners):
            try:
                listener(event, secret)
            except Exception:
                log.exception("event listener failed")

    async def start(self) -> None:
        """Load runtime companies and discovered sessions; restore every paired company."""
        sessions.ensure_root(self.sessions_root)
        for company in self.registry.load():
            if company.id not in self.companies:
                self.companies[company.id] = Runner(self, company, "runtime")
        for found in sessions.discover(self.sessions_root):
            if found.company not in self.companies:
                log.info("found a paired session on disk", company=found.company, engine=found.engine)
                self.companies[found.company] = Runner(
                    self, CompanyConfig(id=found.company, engine=found.engine), "discovered")
        for runner in self.companies.values():
            state = sessions.session_state(runner.session_dir)
            if state != "none":
                runner.start("restoring the stored session at daemon start" if state == "paired"
                             else "checking a session store that cannot be read")

    async def shutdown(self, timeout: float) -> None:
        self.stopping = True
        grace = min(self.config.workers_stop_grace, timeout)
        await asyncio.gather(*(r.stop("daemon stopping", grace) for r in self.companies.values()),
                             return_exceptions=True)
        await self.kill_all()  # whatever is still there (it should be nothing) does not outlive us

    async def kill_all(self) -> None:
        self.stopping = True
        for runner in self.companies.values():
            runner.want_running = False
            if runner.worker is not None:
                runner.worker.kill("forced shutdown")
        await asyncio.gather(*(r.worker.proc.wait() for r in self.companies.values() if r.worker),
                             return_exceptions=True)

    async def apply(self, config: Config, diff: ConfigDiff) -> None:
        """Apply a reloaded config: only the companies in the diff are touched."""
        self.config = config
        self.limiter.rate = config.reconnect_connect_rate
        for runner in self.companies.values():
            runner.backoff.policy = self.backoff_policy
        for cid in diff.removed:
            dropped = self.companies.get(cid)
            if dropped is None:  # deleted through the API meanwhile
                continue
            async with dropped.exclusive():
                runtime = self.registry.get(cid)
                if runtime is not None:
                    dropped.config, dropped.source = runtime, "runtime"
                    continue
                if await self._remove(dropped, "removed from the config"):
                    log.info("company removed by reload", company=cid)
        for cid in diff.added:
            company = config.company(cid)
            assert company is not None
            existing = self.companies.get(cid)
            if existing is not None:  # was runtime or discovered: the config now owns it
                existing.config, existing.source = company, "config"
                continue
            runner = self.companies[cid] = Runner(self, company, "config")
            log.info("company added by reload", company=cid)
            if runner.has_session():
                runner.start("added to the config with a stored session")
        for cid in diff.changed:
            company = config.company(cid)
            assert company is not None
            changed = self.companies.get(cid)
            if changed is None:
                continue
            old, changed.config = changed.config, company
            log.info("company changed by reload", company=cid)
            if changed.worker is not None and (old.engine != company.engine or old.proxy != company.proxy):
                with contextlib.suppress(ApiError):  # deleted while the restart waited its turn
                    await changed.restart("engine or proxy changed by reload")

    def get(self, company_id: str) -> Runner:
        runner = self.companies.get(company_id)
        if runner is None:
            raise ApiError(ErrorCode.COMPANY_NOT_FOUND, f"no company {company_id!r}; add it to the config "
                           "or with PUT /v1/companies/{id}")
        return runner

    async def put_company(self, company: CompanyConfig) -> tuple[bool, Runner]:
        while (existing := self.companies.get(company.id)) is not None:
            async with existing.exclusive():
                if existing.removed:
                    continue  # deleted while this waited its turn: create it anew
                if existing.source == "config":
                    raise ApiError(ErrorCode.DEFINED_IN_CONFIG, f"company {company.id!r} is defined in the "
                                   f"config file ({self.config.source}); change it there and reload")
                self.registry.put(company)
                old, existing.config, existing.source = existing.config, company, "runtime"
                if existing.worker is not None and (old.engine != company.engine or old.proxy != company.proxy):
                    await existing.restart_unlocked("engine or proxy changed")
                return False, existing
        self.registry.put(company)
        runner = self.companies[company.id] = Runner(self, company, "runtime")
        log.info("company added at runtime", company=company.id)
        if runner.has_session():
            runner.start("added with a stored session")
        self.on_change()
        return True, runner

    async def delete_company(self, company_id: str, wipe: bool) -> dict[str, Any]:
        """Stop (wipe=False) or log out and wipe (wipe=True) a company; a runtime one is then
        removed. Idempotent under concurrency: a delete that waited for another one that
        removed the company gets that one's answer."""
        runner = self.get(company_id)
        async with runner.exclusive():
            if runner.removed:
                if runner.removal is not None:
                    return dict(runner.removal)
                raise ApiError(ErrorCode.COMPANY_NOT_FOUND, f"company {company_id!r} was removed meanwhile")
            result: dict[str, Any] = {"id": company_id}
            if wipe:
                result |= await runner.logout_unlocked()
            else:
                runner.stopped_by_operator = True
                await runner.stop_unlocked("stopped by the operator")
            if runner.source != "config":
                self.registry.remove(company_id)
                if wipe or not runner.has_session():
                    await self._remove(runner, "removed")
                    result["removed"] = True
            result["state"] = str(runner.state)
            if runner.removed:
                runner.removal = dict(result)
        self.on_change()
        return result

    async def _remove(self, runner: Runner, reason: str) -> bool:
        """Stop a company for good and forget it (its act lock held). False if already gone."""
        if runner.removed:
            return False
        runner.removed = True
        await runner.stop_unlocked(reason)
        if self.companies.get(runner.id) is runner:
            del self.companies[runner.id]
        return True

    def counts(self) -> dict[str, int]:
        return dict(collections.Counter(str(r.state) for r in self.companies.values()))

    def list(self) -> list[dict[str, Any]]:
        return [self.companies[cid].snapshot() for cid in sorted(self.companies)]

    def status_line(self) -> str:
        total = len(self.companies)
        if not total:
            return "no companies configured"
        connected = sum(1 for r in self.companies.values() if r.state is State.CONNECTED)
        notes = []
        for runner in sorted(self.companies.values(), key=lambda r: r.id):
            if runner.state in (State.CONNECTED, State.STOPPED):
                continue
            note = f"{runner.id} {runner.state}"
            if runner.retry_at is not None and runner.worker is None:
                note += f" (retry in {max(0, round(runner.retry_at - time.time()))}s)"
            notes.append(note)
        line = f"{connected}/{total} connected"
        if notes:
            line += "; " + ", ".join(notes[:3]) + (f" and {len(notes) - 3} more" if len(notes) > 3 else "")
        return line

