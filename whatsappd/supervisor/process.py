"""One worker process as the supervisor sees it: launched, spoken to, watched, ended.

`WorkerProcess` owns everything about the process that is not policy: its channel, the
requests waiting for a reply, whether it is still alive (heartbeat and the deadlines of a
connection attempt, as uvicorn's Process.ping/is_alive own liveness), and how it is killed or
stopped. What its end *means* for the company is the runner's business (runner.py).

Launching is one small seam, `Launch`: `launch_subprocess` execs each worker; a `Launcher`
(supervisor/launcher.py's ZygoteLauncher: workers forked by one preloaded process per engine)
has the same signature and a close() for the helper processes it keeps.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import os
import signal
import socket
import sys
import time
from collections.abc import AsyncGenerator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from whatsappd.errors import ErrorCode, Failure
from whatsappd.logs import current_format, get_logger
from whatsappd.protocol import (
    MAX_LINE,
    ConnectGrant,
    Fence,
    Paired,
    Qr,
    Reply,
    ReplyError,
    StateReport,
    Stop,
    WorkerMessage,
    WorkerState,
    decode,
    encode,
    parse_worker_message,
)
from whatsappd.systemd import scrub_environment

__all__ = ["Deadlines", "Exit", "Kill", "Launch", "Launcher", "OsProcess", "WorkerProcess", "WorkerSpec",
           "launch_subprocess", "start_worker", "worker_arguments", "worker_environment"]

log = get_logger()

#: The worker's environment variable holding the PostgreSQL whatsmeow store's DSN (never argv).
WHATSMEOW_DSN_ENV = "WHATSAPPD_WHATSMEOW_DSN"
#: After a kill, how long to keep reading before looking at the deadlines again (EOF comes once
#: the process is gone).
_AFTER_KILL = 5.0
#: Worker states that answer a connection attempt (its connect deadline no longer runs).
_ATTEMPT_ANSWERED = frozenset({WorkerState.PAIRING, WorkerState.CONNECTED, WorkerState.BANNED})


class Kill(enum.StrEnum):
    """Why the supervisor killed a worker (logged as `killed=`; the runner reads some of them)."""

    HEARTBEAT = "heartbeat"  # silent for longer than the heartbeat timeout
    CONNECT_TIMEOUT = "connect_timeout"  # neither pairing nor connected in time
    PAIRING_TIMEOUT = "pairing_timeout"  # nobody scanned the QR in time
    PAIRED_WITHOUT_CONNECT = "paired_without_connect"  # paired, but the forced reconnect never came
    KEEPALIVE = "keepalive"  # reconnecting in vain for too long
    PROTOCOL_VIOLATION = "protocol_violation"  # a line too long or not a protocol message
    STOP_GRACE_EXCEEDED = "stop_grace_exceeded"  # asked to stop, still there after the grace
    SEND_TIMEOUT = "send_timeout"  # a send got no answer (messaging kills it; its send log settles the message)
    SUPERVISOR_ERROR = "supervisor_error"  # the runner failed while serving it
    RUNNER_ENDED = "runner ended"  # its runner ended (a bug's cleanup)
    FORCED_SHUTDOWN = "forced shutdown"  # the daemon is going away now
    LEASE_LOST = "lease_lost"  # [cluster]: this host lost the company's lease (or its deadline passed)


@dataclass(frozen=True)
class WorkerSpec:
    """What a worker is launched with: everything its command line and environment say."""

    company: str
    session_dir: Path
    engine: str
    proxy: str | None  # the company's own proxy URL (it may carry credentials)
    pair: bool  # no paired session: start by pairing
    heartbeat_interval: float
    log_level: str
    sim_server_dir: Path | None = None  # a simulator company's shared "server" ([simulator] server_dir)
    fence_deadline: float | None = None  # [cluster]: CLOCK_MONOTONIC time the worker dies at unless refreshed
    # issue 13 (pgsession): the PostgreSQL whatsmeow store; the DSN only ever in the environment
    whatsmeow_dsn: str | None = None  # neonize's store in PostgreSQL (None: the session's store.db)
    jid: str | None = None  # the device to restore there (never None when restoring from PostgreSQL)


@dataclass(frozen=True)
class Deadlines:
    """How long a worker may take before it is killed (seconds); fixed when it starts."""

    heartbeat: float  # silence
    connect: float  # from the start to pairing or a connection
    pairing: float  # from the start to a scanned QR
    paired_connect: float  # from `paired` to `connected` (the server's forced reconnect)
    stuck_reconnecting: float  # reconnecting in vain, not counting time paced by our limiter


@dataclass(frozen=True)
class Exit:
    """How a worker ended."""

    code: int | None  # its exit status (negative: killed by that signal); None if it never ran
    kill_reason: str | None  # why we killed it, if we did


class OsProcess(Protocol):
    """The OS process under a worker: what asyncio.subprocess.Process offers and we use."""

    @property
    def pid(self) -> int: ...
    @property
    def returncode(self) -> int | None: ...
    def send_signal(self, sig: int) -> None: ...
    async def wait(self) -> int: ...


#: Starts a worker process; returns it and the supervisor's end of its channel.
Launch = Callable[[WorkerSpec], Awaitable[tuple[OsProcess, socket.socket]]]


@runtime_checkable
class Launcher(Protocol):
    """A Launch that keeps helper processes of its own (a zygote per engine, supervisor/launcher.py):
    close() ends them at shutdown, never a worker."""

    def __call__(self, spec: WorkerSpec, /) -> Awaitable[tuple[OsProcess, socket.socket]]: ...
    async def prepare(self, engine: str) -> None: ...
    async def close(self) -> None: ...


async def prepare_launch(launch: Launch, engine: str) -> None:
    """Make the launcher ready to start a worker of this engine at once (boot its zygote), so a
    connect token taken next is spent on a dial within milliseconds, not after a boot."""
    if isinstance(launch, Launcher):
        await launch.prepare(engine)


def worker_arguments(spec: WorkerSpec) -> list[str]:
    """The worker main's arguments (`python -m whatsappd.worker ARGS`), without --channel-fd:
    exec'd or forked by a zygote, a worker reads the same ones."""
    args = [
        "--company", spec.company, "--session-dir", str(spec.session_dir), "--engine", spec.engine,
        "--parent-pid", str(os.getpid()),
        "--heartbeat", str(spec.heartbeat_interval),
        "--log-format", current_format(), "--log-level", spec.log_level,
    ]
    if spec.pair:
        args.append("--pair")
    if spec.sim_server_dir is not None:
        args += ["--sim-server-dir", str(spec.sim_server_dir)]
    if spec.fence_deadline is not None:
        args += ["--fence-deadline", repr(spec.fence_deadline)]
    if spec.jid:
        args += ["--jid", spec.jid]
    return args


def worker_environment(proxy: str | None, whatsmeow_dsn: str | None = None) -> dict[str, str]:
    """A worker's whole environment: ours, scrubbed of systemd's variables, with only the
    company's own proxy (and the whatsmeow store's DSN, when it is in PostgreSQL)."""
    env = scrub_environment(os.environ)
    env.pop("WHATSAPPD_PROXY", None)  # only ever the company's own proxy
    env.pop(WHATSMEOW_DSN_ENV, None)
    if whatsmeow_dsn:
        env[WHATSMEOW_DSN_ENV] = whatsmeow_dsn  # a DSN may carry a password: never on argv
    if proxy:
        # In the environment, not argv: a proxy URL may carry credentials, and any local user
        # can read a process's argv, while its environment is the owner's alone.
        env["WHATSAPPD_PROXY"] = proxy
    return env


async def launch_subprocess(spec: WorkerSpec) -> tuple[OsProcess, socket.socket]:
    """Start `python -m whatsappd.worker` with a scrubbed environment and a socketpair channel."""
    parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    args = [sys.executable, "-m", "whatsappd.worker", *worker_arguments(spec), "--channel-fd", str(child.fileno())]
    try:
        # Its own session: Ctrl-C (SIGINT to the terminal's foreground process group) or a
        # terminal hangup reaches the daemon only, which then stops its workers in order. The
        # worker's parent-death signal still ends it if the daemon dies (even by kill -9).
        proc = await asyncio.create_subprocess_exec(
            *args, pass_fds=(child.fileno(),), env=worker_environment(spec.proxy, spec.whatsmeow_dsn), start_new_session=True,
            stdin=asyncio.subprocess.DEVNULL, stdout=None, stderr=None,
        )
    except BaseException:
        parent.close()
        raise
    finally:
        child.close()
    return proc, parent


async def start_worker(spec: WorkerSpec, deadlines: Deadlines, launch: Launch = launch_subprocess) -> WorkerProcess:
    """Launch a worker and open its channel."""
    proc, channel = await launch(spec)
    reader, writer = await asyncio.open_unix_connection(sock=channel, limit=MAX_LINE)
    return WorkerProcess(spec.company, proc, reader, writer, deadlines)


class WorkerProcess:
    """A running worker: its process, channel, pending requests and liveness."""

    def __init__(self, company: str, proc: OsProcess, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 deadlines: Deadlines) -> None:
        self.company = company
        self.proc = proc
        self._reader = reader
        self._writer = writer
        self._deadlines = deadlines
        self.kill_reason: str | None = None
        self.booted = False  # has said anything yet
        self._on_boot: Callable[[], None] | None = None
        self._pending: dict[int, asyncio.Future[Reply]] = {}
        self._next_id = 1
        # A reconnect attempt the worker asked a token for (connect_request), and the seconds
        # its reconnects spent waiting for tokens since it last lost its connection.
        self._grant: asyncio.Task[None] | None = None
        self._paced = 0.0
        # Liveness (time.monotonic): when it was last heard, and the deadlines of the attempt.
        self._started = self._last_seen = time.monotonic()
        self._connect_due: float | None = self._started + deadlines.connect
        self._pairing_due: float | None = None
        self._paired_due: float | None = None
        self._reconnecting_since: float | None = None

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def waiting_for_grant(self) -> bool:
        return self._grant is not None and not self._grant.done()

    def until_booted(self, release: Callable[[], None]) -> None:
        """Call release once the worker first speaks, or ends without having spoken."""
        self._on_boot = release

    # ------------------------------------------------------------------------ the channel

    def send(self, message: dict[str, Any]) -> None:
        if not self._writer.is_closing():
            self._writer.write(encode(message))

    def fence(self, deadline: float) -> None:
        """Move the worker's dead-man deadline on ([cluster], after a lease renewal)."""
        self.send(Fence(deadline).to_wire())

    def ask_to_stop(self) -> None:
        """Ask the worker to disconnect and exit (see stop() for the grace and the kill)."""
        self.send(Stop().to_wire())

    async def call(self, op: str, args: dict[str, Any], timeout: float) -> dict[str, Any]:
        """Run one command in the worker and return its result; a refusal raises Failure."""
        request_id = self._next_id
        self._next_id += 1
        future: asyncio.Future[Reply] = asyncio.get_running_loop().create_future()
        self._pending[request_id] = future
        self.send({"type": "command", "id": request_id, "company": self.company, "op": op, "args": args})
        try:
            reply = await asyncio.wait_for(future, timeout)
        except TimeoutError:
            raise Failure(ErrorCode.WORKER_TIMEOUT, f"the worker of {self.company!r} did not answer within "
                          f"{timeout:g}s") from None
        finally:
            self._pending.pop(request_id, None)
        if not reply.ok:
            raise reply.failure()
        return dict(reply.result or {})

    def grant_connect(self, acquire: Callable[[], Awaitable[None]]) -> None:
        """Answer a connect_request once acquire() gives a token (one request at a time)."""
        if not self.waiting_for_grant:
            self._grant = asyncio.get_running_loop().create_task(self._grant_after(acquire))

    async def _grant_after(self, acquire: Callable[[], Awaitable[None]]) -> None:
        started = time.monotonic()
        try:
            await acquire()
        finally:
            self._paced += time.monotonic() - started
        self.send(ConnectGrant().to_wire())

    async def messages(self) -> AsyncGenerator[WorkerMessage]:
        """The worker's messages until EOF, replies excepted (they settle call()).

        Kills the worker when a deadline passes or it breaks the protocol, and keeps reading:
        EOF comes once the process is gone. A deadline is judged only once what the worker
        already said is read: a consumer that was away (the runner awaiting the database while
        it records a paired JID) must not kill a worker whose heartbeats wait in the pipe.
        """
        judged = False  # killed for a deadline: from then on, only read until EOF
        while True:
            now = time.monotonic()
            reason, due = self._next_deadline()
            overdue = due <= now
            if overdue and judged:
                due = now + _AFTER_KILL
            try:
                # asyncio.timeout, not wait_for: no extra task per heartbeat (idle CPU). Overdue,
                # the timeout is 0: a line already buffered is still returned.
                async with asyncio.timeout(max(0.0, due - now)):
                    line = await self._reader.readline()
            except TimeoutError:
                if overdue and not judged:
                    if self.kill_reason is None:
                        log.warning("killing worker", company=self.company, pid=self.pid, reason=str(reason))
                    self.kill(reason)
                    judged = True
                continue
            except (ValueError, asyncio.LimitOverrunError):
                self.kill(Kill.PROTOCOL_VIOLATION)
                continue
            except OSError:
                # Reset by a worker we killed while it had unread data: that is its end, and
                # the runner classifies the exit like any other.
                return
            if not line:
                return
            self._heard()
            try:
                message = parse_worker_message(decode(line))
            except ValueError as exc:
                log.error("bad message from worker; killing it", company=self.company, pid=self.pid, error=str(exc))
                self.kill(Kill.PROTOCOL_VIOLATION)
                continue
            if isinstance(message, Reply):
                future = self._pending.get(message.id) if message.id is not None else None
                if future is not None and not future.done():
                    future.set_result(message)
                continue
            self._observe(message)
            yield message

    # -------------------------------------------------------------------------- liveness

    def _heard(self) -> None:
        self._last_seen = time.monotonic()
        if not self.booted:
            self.booted = True  # it runs and speaks
            self._booted()

    def _booted(self) -> None:
        release, self._on_boot = self._on_boot, None
        if release is not None:
            release()

    def _observe(self, message: WorkerMessage) -> None:
        """Move the deadlines of the connection attempt along with what the worker reports."""
        match message:
            case StateReport(state=state):
                if state in _ATTEMPT_ANSWERED:
                    self._connect_due = None
                if state is WorkerState.PAIRING and self._pairing_due is None:
                    self._pairing_due = self._started + self._deadlines.pairing
                if state is WorkerState.CONNECTED:
                    self._pairing_due = self._paired_due = self._reconnecting_since = None
                elif state is WorkerState.RECONNECTING and self._reconnecting_since is None:
                    self._reconnecting_since, self._paced = time.monotonic(), 0.0
            case Qr():
                self._connect_due = None
                if self._pairing_due is None:
                    self._pairing_due = self._started + self._deadlines.pairing
            case Paired():
                self._pairing_due = None
                self._paired_due = time.monotonic() + self._deadlines.paired_connect

    def _stuck_due(self) -> float | None:
        """When a worker reconnecting in vain is killed (keepalive). Time its reconnects spent
        waiting for our own connect-rate limiter does not count: that is pacing, not being stuck."""
        if self._reconnecting_since is None or self.waiting_for_grant:
            return None
        return self._reconnecting_since + self._paced + self._deadlines.stuck_reconnecting

    def _next_deadline(self) -> tuple[Kill, float]:
        deadlines = {
            Kill.HEARTBEAT: self._last_seen + self._deadlines.heartbeat,
            Kill.CONNECT_TIMEOUT: self._connect_due,
            Kill.PAIRING_TIMEOUT: self._pairing_due,
            Kill.PAIRED_WITHOUT_CONNECT: self._paired_due,
            Kill.KEEPALIVE: self._stuck_due(),
        }
        return min(((k, v) for k, v in deadlines.items() if v is not None), key=lambda kv: kv[1])

    # ----------------------------------------------------------------------------- ending

    def kill(self, reason: str) -> None:
        if self.proc.returncode is None:
            self.kill_reason = self.kill_reason or reason
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGKILL)

    async def stop(self, grace: float) -> None:
        """Ask the worker to disconnect; SIGKILL it if it is still there after grace seconds."""
        self.ask_to_stop()
        try:
            await asyncio.wait_for(asyncio.shield(self.proc.wait()), grace)
        except TimeoutError:
            log.warning("worker did not stop in time; killing it", pid=self.pid, grace_seconds=grace)
            self.kill(Kill.STOP_GRACE_EXCEEDED)
            await self.proc.wait()

    async def wait(self) -> int:
        return await self.proc.wait()

    async def close(self) -> Exit:
        """Wait for the process to end and settle what it leaves behind: the boot hold, a
        connect token not yet handed over (it goes back), requests still waiting for a reply."""
        if self._grant is not None:
            self._grant.cancel()
        if not self.booted:
            self._booted()
        code = await self.proc.wait()
        self._writer.close()
        for future in self._pending.values():
            if not future.done():
                future.set_result(Reply(None, error=ReplyError(ErrorCode.WORKER_EXITED, "the worker exited")))
        return Exit(code, self.kill_reason)
