"""Workers forked by a zygote (`[workers] launcher = "zygote"`): the supervisor's side.

`ZygoteLauncher` fills process.py's `Launch` seam (a WorkerSpec in; the OS process and the
supervisor's end of its channel out) and is a `Launcher`: close() ends its zygotes at shutdown.
`make_launch` picks it or `launch_subprocess` (exec, about 40 MiB per neonize worker) from the
config.

One zygote process per engine (`python -m whatsappd.worker.zygote`, worker/zygote.py) imports a
worker's code once and forks each worker; the worker is reparented to the supervisor, which is
a child subreaper, so the supervisor reaps it like any child and learns its exact exit status
(`AdoptedProcess`: pid, wait, send_signal, as asyncio's Process). A zygote that dies or hangs
takes no running worker with it (they are not its children); the supervisor starts a new one
(backing off if it keeps failing) and meanwhile execs workers, so no connection waits for it.

Every worker, however started, runs in its own session: a Ctrl-C on the terminal of a
foreground daemon goes to the daemon alone, which stops its workers in order.
"""

from __future__ import annotations

import asyncio
import ctypes
import json
import os
import signal
import socket
import sys
import threading

from whatsappd.logs import current_format, get_logger
from whatsappd.protocol import ZYGOTE_GO
from whatsappd.supervisor.backoff import Backoff, BackoffPolicy
from whatsappd.supervisor.process import (
    Launch,
    Launcher,
    OsProcess,
    WorkerSpec,
    launch_subprocess,
    worker_arguments,
    worker_environment,
)

__all__ = ["AdoptedProcess", "ZygoteLauncher", "make_launch"]

log = get_logger()

PR_SET_CHILD_SUBREAPER = 36

#: How long a zygote may take to import the worker code (seconds; a loaded machine is slow).
ZYGOTE_BOOT_TIMEOUT = 30.0
#: How long a fork request may take until the worker reports its pid; then the zygote is
#: deemed hung, killed and replaced, and that worker is exec'd instead.
ZYGOTE_FORK_TIMEOUT = 5.0
#: Restarts of a zygote that keeps dying back off like a company's reconnects.
ZYGOTE_BACKOFF = BackoffPolicy(initial_delay=1.0, multiplier=2.0, max_delay=300.0, stable_after=60.0)


def make_launch(launcher: str, log_level: str) -> Launch | Launcher:
    """How the supervisor starts workers, by `[workers] launcher`."""
    return ZygoteLauncher(log_level) if launcher == "zygote" else launch_subprocess


class AdoptedProcess:
    """A child this process did not start itself: a zygote's worker, reparented to us.

    Waited for like asyncio waits for its own children: a pidfd in the event loop (a thread
    where the kernel has no pidfd_open), then waitpid() for the exact status. Until it is
    reaped its pid cannot be reused, so send_signal() never hits another process.
    """

    def __init__(self, pid: int, on_exit: set[int] | None = None) -> None:
        self._pid = pid
        self._returncode: int | None = None
        self._loop = asyncio.get_running_loop()
        self._done: asyncio.Future[int] = self._loop.create_future()
        self._registry = on_exit
        if on_exit is not None:
            on_exit.add(pid)
        self._pidfd: int | None = None
        try:
            self._pidfd = os.pidfd_open(pid)
        except OSError:
            threading.Thread(target=self._wait_blocking, name=f"wait-{pid}", daemon=True).start()
        else:
            self._loop.add_reader(self._pidfd, self._poll)

    @property
    def pid(self) -> int:
        return self._pid

    @property
    def returncode(self) -> int | None:
        return self._returncode

    def send_signal(self, sig: int, /) -> None:
        if self._returncode is None:
            os.kill(self._pid, sig)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    async def wait(self) -> int:
        return await asyncio.shield(self._done)

    def _poll(self) -> None:
        try:
            pid, status = os.waitpid(self._pid, os.WNOHANG)
        except ChildProcessError:
            log.error("an adopted worker is not our child; its exit status is lost", pid=self._pid)
            self._finish(255)
            return
        if pid:
            self._finish(os.waitstatus_to_exitcode(status))

    def _wait_blocking(self) -> None:
        try:
            _, status = os.waitpid(self._pid, 0)
            code = os.waitstatus_to_exitcode(status)
        except ChildProcessError:
            code = 255
        self._loop.call_soon_threadsafe(self._finish, code)

    def _finish(self, code: int) -> None:
        if self._pidfd is not None:
            self._loop.remove_reader(self._pidfd)
            os.close(self._pidfd)
            self._pidfd = None
        if self._registry is not None:
            self._registry.discard(self._pid)
        if self._returncode is None:
            self._returncode = code
            self._done.set_result(code)


class ZygoteError(Exception):
    """This worker could not come from the zygote (it is exec'd instead)."""


class ZygoteLauncher:
    """Workers forked by one zygote per engine; exec'd while a zygote is unavailable (a Launcher)."""

    def __init__(self, log_level: str, zygote_args: tuple[str, ...] = ()) -> None:
        self.log_level = log_level
        self.zygote_args = zygote_args  # extra zygote arguments (bench/bench_zygote.py only)
        self.adopted: set[int] = set()  # live workers the zygotes made (never swept)
        self._zygotes: dict[str, _Zygote] = {}
        self._subreaper: bool | None = None
        self.closed = False

    async def start_zygote(self, engine: str) -> int | None:
        """Boot this engine's zygote now (it otherwise boots with the first worker); its pid, or
        None if workers of this engine are exec'd."""
        zygote = self._zygote(engine)
        if zygote is None or not await zygote.wait_ready() or zygote.proc is None:
            return None
        return zygote.proc.pid

    async def prepare(self, engine: str) -> None:
        """Boot this engine's zygote if it is not up (a no-op while workers of it are exec'd)."""
        await self.start_zygote(engine)

    async def __call__(self, spec: WorkerSpec, /) -> tuple[OsProcess, socket.socket]:
        zygote = self._zygote(spec.engine)
        if zygote is not None and await zygote.wait_ready():
            parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                return await zygote.fork(spec, child), parent
            except ZygoteError as exc:
                parent.close()
                log.warning("the zygote did not start this worker; exec'ing it", company=spec.company,
                            engine=spec.engine, reason=str(exc))
            except BaseException:
                parent.close()
                raise
            finally:
                child.close()
        return await launch_subprocess(spec)

    def _zygote(self, engine: str) -> _Zygote | None:
        if self.closed:
            return None
        if self._subreaper is None:
            self._subreaper = _become_subreaper()
            if not self._subreaper:
                log.error("cannot become a child subreaper (prctl); workers are exec'd, not forked by a zygote")
        if not self._subreaper:
            return None
        if engine not in self._zygotes:
            self._zygotes[engine] = _Zygote(self, engine)
        return self._zygotes[engine]

    async def close(self) -> None:
        self.closed = True
        await asyncio.gather(*(z.close() for z in self._zygotes.values()))


def _become_subreaper() -> bool:
    """Make orphaned descendants (a zygote's workers) our children: PR_SET_CHILD_SUBREAPER."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return int(libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)) == 0
    except (OSError, AttributeError):
        return False


class _Zygote:
    """One engine's zygote process: booted on first use, replaced when it dies or hangs."""

    def __init__(self, launcher: ZygoteLauncher, engine: str) -> None:
        self.launcher = launcher
        self.engine = engine
        self.proc: asyncio.subprocess.Process | None = None
        self.control: socket.socket | None = None
        self.ready = False
        # False once a zygote failed: launches then exec at once instead of waiting for a boot.
        self.healthy = True
        self.backoff = Backoff(ZYGOTE_BACKOFF)
        self._boot: asyncio.Task[bool] | None = None
        self._watch: asyncio.Task[None] | None = None
        self._restart: asyncio.TimerHandle | None = None
        self._lock = asyncio.Lock()  # one fork at a time; sweeps wait for the fork in flight
        self._closing = False

    async def wait_ready(self) -> bool:
        """True if it can fork now; boots it if needed (waiting only while it never failed)."""
        if self.ready:
            return True
        if self._closing:
            return False
        booting = self._boot is not None and not self._boot.done()
        if not booting and self._restart is None and self.proc is None:
            self._boot = asyncio.get_running_loop().create_task(self._start(), name=f"zygote-{self.engine}")
            booting = True
        if booting and self.healthy and self._boot is not None:
            return await asyncio.shield(self._boot)
        return False

    async def _start(self) -> bool:
        loop = asyncio.get_running_loop()
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        env = worker_environment(None)  # a worker gets only its own company's proxy, in its request
        try:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "whatsappd.worker.zygote", "--engine", self.engine,
                "--control-fd", str(child.fileno()), "--parent-pid", str(os.getpid()),
                "--log-format", current_format(), "--log-level", self.launcher.log_level,
                *self.launcher.zygote_args, pass_fds=(child.fileno(),), env=env, stdin=asyncio.subprocess.DEVNULL, stdout=None,
                stderr=None, start_new_session=True,
            )
        except OSError as exc:
            log.error("cannot start a zygote; workers are exec'd", engine=self.engine, error=str(exc))
            parent.close()
            self._failed()
            return False
        finally:
            child.close()
        parent.setblocking(False)
        self.proc, self.control = proc, parent
        self._watch = loop.create_task(self._watch_exit(proc), name=f"zygote-{self.engine}-watch")
        try:
            async with asyncio.timeout(ZYGOTE_BOOT_TIMEOUT):
                data = await loop.sock_recv(parent, 4096)
            ready = json.loads(data) if data else {}
        except (TimeoutError, OSError, ValueError):
            ready = {}
        if not isinstance(ready, dict) or ready.get("type") != "ready":
            self.healthy = False
            if proc.returncode is None:
                log.warning("the zygote did not become ready; killing it", engine=self.engine, pid=proc.pid)
                proc.kill()
            return False
        self.ready = self.healthy = True
        self.backoff.connected()
        log.info("zygote started", engine=self.engine, pid=proc.pid, boot_seconds=ready.get("seconds"))
        return True

    async def _watch_exit(self, proc: asyncio.subprocess.Process) -> None:
        code = await proc.wait()
        self.ready = False
        if self.control is not None:
            self.control.close()
            self.control = None
        self.proc = None
        if self._closing:
            log.info("zygote stopped", engine=self.engine, pid=proc.pid, exit_code=code)
        else:
            log.warning("zygote exited; its workers run on, new ones are exec'd until it is back",
                        engine=self.engine, pid=proc.pid, exit_code=code)
        async with self._lock:  # a fork in flight settles first (adopted, or given up)
            await self._sweep(proc.pid)
        self._boot = None
        if not self._closing:
            self._failed()

    def _failed(self) -> None:
        self.healthy = False
        delay = self.backoff.next_delay()
        self._restart = asyncio.get_running_loop().call_later(delay, self._restart_now)

    def _restart_now(self) -> None:
        self._restart = None
        if not self._closing and self.proc is None and (self._boot is None or self._boot.done()):
            self._boot = asyncio.get_running_loop().create_task(self._start(), name=f"zygote-{self.engine}")

    async def fork(self, spec: WorkerSpec, channel: socket.socket) -> AdoptedProcess:
        loop = asyncio.get_running_loop()
        async with self._lock:
            if not self.ready or self.control is None or self.proc is None:
                raise ZygoteError("the zygote is not running")
            zygote_pid = self.proc.pid
            request = json.dumps({"type": "fork", "company": spec.company, "args": worker_arguments(spec),
                                  "env": worker_environment(spec.proxy, spec.whatsmeow_dsn)}).encode()
            gate, gate_child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                try:
                    socket.send_fds(self.control, [request], [channel.fileno(), gate_child.fileno()])
                except OSError as exc:  # full (it stopped reading) or gone
                    self._kill("unreachable")
                    raise ZygoteError(f"the zygote cannot be reached ({exc.strerror}); it is replaced") from None
                finally:
                    gate_child.close()
                gate.setblocking(False)
                try:
                    async with asyncio.timeout(ZYGOTE_FORK_TIMEOUT):
                        line = await _read_pid_line(loop, gate)
                except TimeoutError:
                    self._kill("hung")
                    raise ZygoteError(f"no worker within {ZYGOTE_FORK_TIMEOUT:g}s; the zygote is "
                                      "killed and replaced") from None
                if not line.strip().isdigit():
                    # Whatever this start left that became ours (a worker that died before it
                    # reported its pid) is reaped now, not when the zygote ends.
                    await self._sweep(zygote_pid)
                    raise ZygoteError("the worker did not start; see the zygote's log")
                worker = AdoptedProcess(int(line), on_exit=self.launcher.adopted)
                try:
                    gate.send(ZYGOTE_GO)
                except OSError:
                    pass  # it is gone already: wait() tells how
                return worker
            finally:
                gate.close()

    def _kill(self, why: str) -> None:
        if self.proc is not None and self.proc.returncode is None:
            if not self._closing:
                log.warning("killing the zygote", engine=self.engine, pid=self.proc.pid, reason=why)
            self.ready = False
            self.proc.kill()

    async def _sweep(self, zygote_pid: int) -> None:
        """Reap what a dead zygote leaves: intermediates, and workers it forked that were never
        adopted (the supervisor gave up on them; they exit on their own, unstarted). Each is
        still in the zygote's session (a worker calls setsid only once adopted)."""
        deadline = asyncio.get_running_loop().time() + 10.0
        while True:
            found = await asyncio.to_thread(_children_in_session, zygote_pid, {zygote_pid, *self.launcher.adopted})
            if not found:
                return
            for pid, state in found:
                try:
                    if state != "Z":
                        os.kill(pid, signal.SIGKILL)
                    os.waitpid(pid, os.WNOHANG)
                except (ProcessLookupError, ChildProcessError):
                    pass
            if asyncio.get_running_loop().time() > deadline:
                log.warning("processes left by a dead zygote", engine=self.engine, pids=[p for p, _ in found])
                return
            await asyncio.sleep(0.05)

    async def close(self) -> None:
        self._closing = True
        if self._restart is not None:
            self._restart.cancel()
            self._restart = None
        if self._boot is not None and not self._boot.done():
            self._boot.cancel()
        self._kill("closing")
        if self._watch is not None:
            await asyncio.gather(self._watch, return_exceptions=True)


async def _read_pid_line(loop: asyncio.AbstractEventLoop, sock: socket.socket) -> bytes:
    """The worker's pid line from the gate; b"" if it closed (or wrote nonsense) first."""
    data = b""
    while not data.endswith(b"\n"):
        chunk = await loop.sock_recv(sock, 32)
        if not chunk or len(data) > 32:
            return b""
        data += chunk
    return data


def _children_in_session(session: int, exclude: set[int]) -> list[tuple[int, str]]:
    """Our children whose session is `session`: (pid, state letter), from /proc."""
    me = os.getpid()
    found = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit() or int(entry.name) in exclude:
            continue
        try:
            with open(f"/proc/{entry.name}/stat") as f:
                fields = f.read().rpartition(")")[2].split()
        except OSError:
            continue
        # after the command name: state, ppid, pgrp, session, ...
        if len(fields) > 3 and int(fields[1]) == me and int(fields[3]) == session:
            found.append((int(entry.name), fields[0]))
    return found
