"""`python -m whatsappd.worker`: one company's WhatsApp client in its own process.

This module owns the process: umask 077, the parent-death signal, the session lock, the
channel to the supervisor and the heartbeat. The engine owns the WhatsApp client.

Why a process per company: neonize's Go core crashes when two clients start or stop at once
in one process, leaks on failed connects, and cannot be unblocked after a QR timeout (see the
design brief). Killing the process is the one reliable way to end a client.
"""

from __future__ import annotations

import argparse
import ctypes
import logging
import math
import os
import signal
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any, NoReturn

from whatsappd.errors import ErrorCode
from whatsappd.protocol import (
    MAX_LINE,
    ConnectRequest,
    EngineError,
    ExitCode,
    Fence,
    Heartbeat,
    Hello,
    Reply,
    ReplyError,
    decode,
    encode,
)
from whatsappd.sessions import LOCK_FILE

PR_SET_PDEATHSIG = 1
PR_SET_MEMORY_MERGE = 67  # Linux 6.4+
MADV_MERGEABLE = 12  # Linux 2.6.32+: one mapping at a time
#: How often a worker on a kernel without PR_SET_MEMORY_MERGE marks its new mappings mergeable.
REMARK_SECONDS = 60.0
#: How often the worker checks that its session's files are still there.
SESSION_CHECK_SECONDS = 1.0


def _find_prctl() -> Any:
    try:
        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None  # not Linux: the channel's EOF still ends us


def _find_madvise() -> Any:
    try:
        madvise = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return None
    madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    return madvise


# Looked up at import: in a zygote that is once for all its workers (each lookup in a forked
# worker would copy some of the zygote's heap).
_prctl = _find_prctl()
_madvise = _find_madvise()
_NOT_MERGED = ("[vvar]", "[vdso]", "[vsyscall]", "[vvar_vclock]")


def mark_mappings_mergeable() -> int:
    """madvise(MADV_MERGEABLE) on each private writable mapping of this process (what KSM can
    merge): the kernels before 6.4 have no PR_SET_MEMORY_MERGE, only this per-mapping flag, which
    covers the mappings that exist now (call again for later ones; marking twice is harmless).
    Returns how many mappings the kernel took."""
    if _madvise is None:
        return 0
    taken = 0
    with open("/proc/self/maps", encoding="ascii", errors="replace") as maps:
        for line in maps:
            fields = line.split()
            span, perms = fields[0], fields[1]
            if perms[1] != "w" or perms[3] != "p" or (len(fields) > 5 and fields[5] in _NOT_MERGED):
                continue
            start, end = (int(part, 16) for part in span.split("-"))
            taken += int(_madvise(start, end - start, MADV_MERGEABLE) == 0)
    return taken


def offer_pages_for_merging() -> str:
    """Let the kernel's same-page merging (KSM) share this process's identical pages with other
    workers'. Answers how: "process" (PR_SET_MEMORY_MERGE, Linux 6.4+: all its memory, now and
    later), "mappings" (older kernels: MADV_MERGEABLE on each mapping there is now; the worker
    marks later ones every REMARK_SECONDS), or "" (neither is possible here).

    Identical pages are most of what workers hold privately: the Go library's relocated data,
    Go's heap after its package init, and the zygote's pages a worker copied on write but left
    equal (CPython writes a reference count and puts it back). Merged, a forked neonize worker's
    private memory falls from ~11 to ~3 MiB (bench/RESULTS.md, issue 9). It only happens where
    the host runs KSM (`/sys/kernel/mm/ksm/run` = 1, off by default): that switch is the
    operator's; without it this costs nothing.
    """
    if _prctl is not None and int(_prctl(PR_SET_MEMORY_MERGE, 1, 0, 0, 0)) == 0:
        return "process"
    return "mappings" if mark_mappings_mergeable() else ""


def _die_with_parent(parent_pid: int) -> None:
    """SIGKILL us when the supervisor dies, even by kill -9 (Linux prctl)."""
    if _prctl is not None:
        _prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        os._exit(ExitCode.STOPPED)


class DeadMan:
    """The dead-man switch of a worker in a cluster: past its fence deadline (absolute
    CLOCK_MONOTONIC seconds, the same clock as the supervisor's on Linux) without a refresh, the
    process ends itself at once with FENCED. A thread of its own, not the engine's or the
    channel's: a supervisor frozen (SIGSTOP, a VM pause) cannot refresh it, and its host may lose
    the company's lease meanwhile, so the worker must not outlive the deadline whatever else hangs."""

    def __init__(self, deadline: float, on_fire: Any) -> None:
        self.deadline = deadline
        self._on_fire = on_fire
        self._moved = threading.Event()

    def extend(self, deadline: float) -> None:
        """A later deadline (a renewal); an earlier one is ignored (messages may cross)."""
        if deadline > self.deadline:
            self.deadline = deadline
            self._moved.set()

    def watch(self) -> None:
        while True:
            left = self.deadline - time.monotonic()
            if left <= 0:
                self._on_fire()
                return
            self._moved.wait(min(left, 1.0))
            self._moved.clear()


class Channel:
    """The worker's end of the socketpair. send() is thread-safe."""

    def __init__(self, fd: int, company: str) -> None:
        self.sock = socket.socket(fileno=fd)
        self.sock.setblocking(True)
        self.company = company
        self._lock = threading.Lock()
        self.closed = False

    def send(self, message: dict[str, Any]) -> None:
        data = encode({**message, "company": self.company})
        with self._lock:
            if self.closed:
                return
            try:
                self.sock.sendall(data)
            except OSError:
                self.closed = True

    def lines(self) -> Any:
        buffer = b""
        while True:
            try:
                chunk = self.sock.recv(65536)
            except OSError:
                return
            if not chunk:
                return
            buffer += chunk
            while b"\n" in buffer:
                line, buffer = buffer.split(b"\n", 1)
                yield line
            if len(buffer) > MAX_LINE:
                return


#: The worker's options: flag -> (type, default); None as default: required. `--pair` is a
#: switch. The supervisor always writes them as `--flag value`, which _parse_args reads
#: directly; anything else (and every mistake) goes to argparse, built from this same table.
#: The direct path matters to a zygote's worker: argparse's code alone copies about 1 MiB of
#: the zygote's heap into each worker.
_OPTIONS: dict[str, tuple[type, Any]] = {
    "--company": (str, None), "--session-dir": (str, None), "--engine": (str, None),
    "--channel-fd": (int, None), "--parent-pid": (int, None), "--proxy": (str, ""),
    "--heartbeat": (float, 5.0), "--log-format": (str, "json"), "--log-level": (str, "info"),
    "--sim-server-dir": (str, ""),  # the simulator's shared "server" ([simulator] server_dir); "": none
    "--fence-deadline": (float, 0.0),  # [cluster]: CLOCK_MONOTONIC deadline (DeadMan); 0: none
    "--jid": (str, ""),
}
_ENGINES = ("neonize", "simulator")


def _argparser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m whatsappd.worker")
    for flag, (kind, default) in _OPTIONS.items():
        if flag == "--proxy":
            p.add_argument(flag, default=os.environ.get("WHATSAPPD_PROXY"),
                           help="proxy URL (default: $WHATSAPPD_PROXY, which the supervisor sets)")
        elif flag == "--engine":
            p.add_argument(flag, choices=_ENGINES, required=True)
        else:
            p.add_argument(flag, type=kind, default=default, required=default is None)
    p.add_argument("--pair", action="store_true")
    return p


def _parse_args(argv: list[str]) -> argparse.Namespace:
    values: dict[str, Any] = {flag[2:].replace("-", "_"): default for flag, (_, default) in _OPTIONS.items()}
    values["proxy"] = os.environ.get("WHATSAPPD_PROXY")
    values["pair"] = False
    try:
        i = 0
        while i < len(argv):
            if argv[i] == "--pair":
                values["pair"], i = True, i + 1
                continue
            kind = _OPTIONS[argv[i]][0]
            values[argv[i][2:].replace("-", "_")] = kind(argv[i + 1])
            i += 2
    except (KeyError, IndexError, ValueError):
        return _argparser().parse_args(argv)
    if any(v is None for k, v in values.items() if k != "proxy") or values["engine"] not in _ENGINES:
        return _argparser().parse_args(argv)  # says what is missing or wrong, and exits 2
    return argparse.Namespace(**values)


class SessionWatch:
    """Notices a session deleted under the running worker (rm -rf of its directory, its files).

    Deleted credentials mean the connection is lost: the worker must not go on serving them
    from open file descriptors, nor let the library create fresh store files beside a half
    session. What counts: the directory itself (same inode as at start), our lock file, and
    the engine's credential files once they existed or the engine said it is paired or
    connected (the simulator replaces its file by rename when it saves, so existence is
    checked, not the inode).
    """

    def __init__(self, session_dir: Path, lock_fd: int, session_files: tuple[str, ...]) -> None:
        self.dir = session_dir
        self._dir_id = self._identity(os.stat(session_dir))
        self._lock_id = self._identity(os.fstat(lock_fd))
        self._files = session_files
        self._seen: set[str] = set()
        self._paired = False

    def note(self, message: dict[str, Any]) -> None:
        """See what the engine tells the supervisor: once paired or connected, the credential
        files must exist (even if they came and went between two checks)."""
        if message.get("type") == "paired" or (message.get("type") == "state" and message.get("state") == "connected"):
            self._paired = True

    @staticmethod
    def _identity(st: os.stat_result) -> tuple[int, int]:
        return (st.st_dev, st.st_ino)

    def _same(self, path: Path, identity: tuple[int, int]) -> bool:
        try:
            return self._identity(os.stat(path)) == identity
        except FileNotFoundError:
            return False

    def missing(self) -> str | None:
        """What of the session is gone, or None while it is whole."""
        if not self._same(self.dir, self._dir_id):
            return str(self.dir)
        if not self._same(self.dir / LOCK_FILE, self._lock_id):
            return str(self.dir / LOCK_FILE)
        for name in self._files:
            if (self.dir / name).exists():
                self._seen.add(name)
            elif name in self._seen or self._paired:
                return str(self.dir / name)
        return None


def main(argv: list[str] | None = None) -> int:
    os.umask(0o077)  # session files 0600, dirs 0700, whatever the library creates
    args = _parse_args(sys.argv[1:] if argv is None else argv)
    _die_with_parent(args.parent_pid)
    merging = offer_pages_for_merging()  # before Go loads and threads start (a zygote's child has it already)

    # Logging before the engine import: `import neonize` calls logging.basicConfig itself.
    from whatsappd.logs import configure_logging, get_logger

    configure_logging(args.log_format, args.log_level)
    import structlog

    structlog.contextvars.bind_contextvars(company=args.company)
    log = get_logger()
    channel = Channel(args.channel_fd, args.company)

    from whatsappd.ids import InvalidCompanyId, check_company_id

    try:
        check_company_id(args.company)
    except InvalidCompanyId as exc:
        log.error("worker started with a bad company id", error=str(exc))
        return ExitCode.BAD_INVOCATION
    os.makedirs(args.session_dir, mode=0o700, exist_ok=True)
    from whatsappd.sessions import lock_session

    lock = lock_session(Path(args.session_dir))
    if lock is None:
        log.error("session is locked by another process; not starting a second client on it",
                  session_dir=args.session_dir)
        return ExitCode.SESSION_LOCKED

    from whatsappd.worker.engine import EngineOptions
    from whatsappd.worker.gate import ConnectGate

    # The supervisor took a token before spawning us: the first attempt needs no request.
    gate = ConnectGate(lambda: channel.send(ConnectRequest().to_wire()), tokens=1, company=args.company)
    server_dir = Path(args.sim_server_dir) if args.sim_server_dir and args.engine == "simulator" else None
    # The whatsmeow store's DSN comes in the environment only (it may carry a password).
    whatsmeow_dsn = os.environ.pop("WHATSAPPD_WHATSMEOW_DSN", "") or None
    options = EngineOptions(company=args.company, session_dir=Path(args.session_dir),
                            proxy=args.proxy, pair=args.pair, gate=gate, server_dir=server_dir,
                            whatsmeow_dsn=whatsmeow_dsn, jid=args.jid or None)
    if args.engine == "simulator":
        from whatsappd.worker.simulator.engine import SimulatorEngine as EngineClass
    else:
        from whatsappd.worker.neonize import lib

        lib.load_library()  # forked by a zygote: neonize's Go library is loaded now, after the fork
        from whatsappd.worker.neonize.engine import NeonizeEngine as EngineClass  # type: ignore[assignment]
    # A shared simulator server keeps the device outside the session directory, and with the
    # credentials in PostgreSQL the directory holds no store file either: only the lock is here.
    watch = SessionWatch(Path(args.session_dir), lock,
                         () if server_dir or whatsmeow_dsn else EngineClass.session_files)

    def emit(message: dict[str, Any]) -> None:
        watch.note(message)
        channel.send(message)

    engine = EngineClass(options, emit)
    channel.send(Hello(os.getpid(), args.engine).to_wire())

    def run_command(message: dict[str, Any]) -> None:
        """Parse the command (once, here), carry it out, answer with the reply of its id."""
        request_id = message.get("id")
        try:
            reply = Reply(request_id, result=engine.execute(engine.parse(message)))
        except EngineError as exc:
            reply = Reply(request_id, error=ReplyError(exc.code, exc.message, exc.permanent))
        except Exception as exc:  # a bug in the engine must not kill the channel
            log.exception("command failed", op=message.get("op"))
            reply = Reply(request_id, error=ReplyError(ErrorCode.ENGINE_ERROR, str(exc)))
        channel.send(reply.to_wire())

    def read_commands() -> None:
        for line in channel.lines():
            try:
                message = decode(line)
            except ValueError:
                log.error("bad message from the supervisor; ignoring it")
                continue
            if message["type"] == "stop":
                engine.stop()
                gate.close()
            elif message["type"] == "connect_grant":
                gate.grant()
            elif message["type"] == "fence" and deadman is not None:
                try:
                    deadman.extend(Fence.parse(message).deadline)
                except ValueError as exc:
                    log.error("bad fence message from the supervisor; ignoring it", error=str(exc))
            elif message["type"] == "command":
                thread = threading.Thread(target=run_command, args=(message,), daemon=True)
                commands.append(thread)
                thread.start()
        # EOF: the supervisor is gone or wants us gone. Stop, and make sure we do end.
        channel.closed = True
        engine.stop()
        gate.close()
        threading.Timer(3.0, os._exit, args=(ExitCode.STOPPED,)).start()

    def heartbeat() -> None:
        while not channel.closed:
            channel.send(Heartbeat().to_wire())
            stop_beating.wait(args.heartbeat)

    remark_at = time.monotonic() + (5.0 if merging == "mappings" else math.inf)  # after Go's first heap

    def watch_session() -> None:
        nonlocal remark_at
        while not stop_beating.wait(SESSION_CHECK_SECONDS):
            if time.monotonic() >= remark_at:  # mappings made since (Go's heap, thread stacks)
                mark_mappings_mergeable()
                remark_at = time.monotonic() + REMARK_SECONDS
            gone = watch.missing()
            if gone is not None:
                # At once, without a clean disconnect: that would give the library one more
                # chance to write, and to re-create store files in a half-deleted session. The
                # supervisor wipes whatever is left once we are gone.
                log.error("session deleted while the worker ran; ending it", missing=gone)
                logging.shutdown()
                os._exit(ExitCode.SESSION_DELETED)

    def fenced() -> None:
        log.error("fence deadline passed without a lease renewal from the supervisor; ending at once",
                  deadline=deadman.deadline if deadman else None)
        logging.shutdown()
        os._exit(ExitCode.FENCED)

    deadman = DeadMan(args.fence_deadline, fenced) if args.fence_deadline else None
    stop_beating = threading.Event()
    commands: list[threading.Thread] = []
    threading.Thread(target=read_commands, name="channel", daemon=True).start()
    if deadman is not None:  # after the reader: a fence already waiting in the channel counts
        threading.Thread(target=deadman.watch, name="dead-man", daemon=True).start()
    threading.Thread(target=heartbeat, name="heartbeat", daemon=True).start()
    threading.Thread(target=watch_session, name="session-watch", daemon=True).start()
    try:
        code = int(engine.run())
    except Exception:
        log.exception("engine crashed")
        code = 70  # EX_SOFTWARE: a crash, restarted with backoff
    gate.close()
    # A command that ended the engine (logout) still owes its reply: let it go out first.
    for thread in list(commands):
        thread.join(timeout=2.0)
    log.debug("worker exiting", exit_code=code)
    return code


def run(argv: list[str] | None = None) -> NoReturn:
    """main(), then leave the process with its exit code (exec'd, or forked by a zygote)."""
    code = main(argv)
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    # os._exit: library threads (neonize's Go runtime) must not keep the process alive.
    os._exit(code)


if __name__ == "__main__":
    run()
