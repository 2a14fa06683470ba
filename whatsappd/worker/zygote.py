"""`python -m whatsappd.worker.zygote`: a worker's code imported once, then forked for each worker.

A neonize worker costs ~40 MiB, nearly all of it the Python heap that importing neonize builds
(its protobuf modules, its client); the Go side is 4-6 MiB. The supervisor therefore execs one
zygote per engine, which imports everything a worker needs except neonize's Go library (see
`whatsappd.worker.neonize.lib`), frees its import-time garbage, freezes the heap (gc.freeze:
the collector never writes to those objects again, so their pages stay shared), and then forks
workers on request. Nothing else lives here: no thread, event loop, SQLite handle or
socket but the control channel. The supervisor itself never forks from its running loop.

Control channel (`--control-fd`, AF_UNIX SOCK_SEQPACKET: one message each):
- zygote -> supervisor, once: `{"type": "ready", "pid", "engine", "seconds"}`;
- supervisor -> zygote, per worker: `{"type": "fork", "company", "args", "env"}` with two fds
  (SCM_RIGHTS): the worker's channel and a gate socket. No answer: the gate is the answer.

How a worker comes to be (the supervisor must know its pid and reap its exact exit status):
1. the zygote forks an intermediate process, which forks the worker and exits at once, so the
   worker is reparented to the supervisor (which is a PR_SET_CHILD_SUBREAPER);
2. the worker waits for that, and exits if its parent is not the supervisor (it died);
3. it writes its pid on the gate and waits for one byte: the supervisor, now its parent,
   answers "g" and reaps it like any child; EOF means the supervisor gave up on this start,
   and the worker leaves without having done anything (no lock taken, no log);
4. its own session (setsid), the environment the supervisor gave, then the worker main, which
   sets umask 077, PR_SET_PDEATHSIG (only now: it fires when the *creating* parent dies, and
   that was the intermediate) and takes the session lock, exactly as an exec'd worker does.
"""

from __future__ import annotations

import argparse
import gc
import importlib
import json
import os
import socket
import sys
import time
import traceback
from typing import Any, NoReturn

from whatsappd.protocol import ZYGOTE_GO, ZYGOTE_MAX_REQUEST

__all__ = ["main", "preload"]

#: Imported by every worker: the worker main and what it imports at start.
_COMMON = ("whatsappd.worker.__main__", "whatsappd.logs", "whatsappd.ids", "whatsappd.sessions",
           "whatsappd.worker.engine", "whatsappd.worker.gate")
#: Imported by a worker of this engine (the neonize engine's import of neonize is special-cased).
_ENGINE = {
    "simulator": ("whatsappd.worker.simulator.engine",),
    "neonize": ("whatsappd.worker.neonize.engine",),
}


def preload(engine: str, worker_code: bool = True) -> None:
    """Import what a worker of this engine needs, except neonize's Go library.

    worker_code=False (benchmark only) imports neonize's Python side alone, as the prototype
    did: whatsappd's own worker modules are then imported by each worker.
    """
    if engine == "neonize":
        from whatsappd.worker import neonize

        neonize.GO_LIBRARY_AT_IMPORT = False  # before anything imports neonize/lib.py
        importlib.import_module("whatsappd.worker.neonize.lib")
    if worker_code:
        for name in (*_COMMON, *_ENGINE[engine]):
            importlib.import_module(name)
        if engine == "neonize" and os.environ.get("WHATSAPPD_NEONIZE_REPLAY") == "1":
            # benchmarks: the replay their workers will run (an import in a worker is not free)
            importlib.import_module("whatsappd.worker.neonize.replay")


def _parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m whatsappd.worker.zygote")
    p.add_argument("--engine", choices=sorted(_ENGINE), required=True)
    p.add_argument("--control-fd", type=int, required=True)
    p.add_argument("--parent-pid", type=int, required=True)
    p.add_argument("--log-format", default="json")
    p.add_argument("--log-level", default="info")
    # What bench/bench_zygote.py switches off to show what each step saves (never in production).
    p.add_argument("--bench-no-worker-code", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--bench-eager-signatures", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--bench-gc", choices=("collect-freeze", "disable-freeze", "freeze", "none"),
                   default="collect-freeze", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    os.umask(0o077)
    args = _parse_args(sys.argv[1:] if argv is None else argv)
    if args.bench_gc == "disable-freeze":
        gc.disable()
    from whatsappd.worker.__main__ import _die_with_parent, offer_pages_for_merging

    _die_with_parent(args.parent_pid)
    # Its workers inherit this; and the pages a worker copied but left equal can merge with ours.
    merging = offer_pages_for_merging()
    from whatsappd.logs import configure_logging, get_logger

    configure_logging(args.log_format, args.log_level)
    log = get_logger(zygote=args.engine)
    control = socket.socket(fileno=args.control_fd)
    started = time.monotonic()
    try:
        preload(args.engine, worker_code=not args.bench_no_worker_code)
    except Exception:
        log.exception("the zygote cannot import the worker code; workers are exec'd instead")
        return 1
    if args.bench_eager_signatures:
        from whatsappd.worker.neonize import lib

        lib.SIGNATURES_ON_USE = False
    # Import-time garbage is freed, then everything alive is frozen: a worker's collections
    # never visit (so never copy) these objects. Without the freeze a worker's first full
    # collection copies ~12 MiB of the zygote's heap (bench/RESULTS.md, issue 9).
    if args.bench_gc == "collect-freeze":
        gc.collect()
    if args.bench_gc != "none":
        gc.freeze()
    seconds = round(time.monotonic() - started, 3)
    try:
        control.send(json.dumps({"type": "ready", "pid": os.getpid(), "engine": args.engine,
                                 "seconds": seconds}).encode())
    except OSError:
        return 0  # the supervisor is gone
    log.info("zygote ready", pid=os.getpid(), preload_seconds=seconds, frozen_objects=gc.get_freeze_count(),
             page_merging=merging)
    return _serve(control, args.parent_pid, log)


def _serve(control: socket.socket, supervisor: int, log: Any) -> int:
    while True:
        try:
            data, fds, flags, _ = socket.recv_fds(control, ZYGOTE_MAX_REQUEST, 2)
        except OSError as exc:
            log.error("the zygote's control channel failed", error=str(exc))
            return 1
        if not data and not fds:
            return 0  # EOF: the supervisor is gone, or wants us gone
        request = _request(data, fds, flags)
        if request is None:
            log.error("bad fork request; ignored", size=len(data), fds=len(fds))
            for fd in fds:
                os.close(fd)
            continue
        _fork(request, fds[0], fds[1], control.fileno(), supervisor, log)


def _request(data: bytes, fds: list[int], flags: int) -> dict[str, Any] | None:
    if flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC) or len(fds) != 2:
        return None
    try:
        request = json.loads(data)
    except ValueError:
        return None
    if not (
        isinstance(request, dict) and request.get("type") == "fork" and isinstance(request.get("company"), str)
        and isinstance(request.get("args"), list) and all(isinstance(a, str) for a in request["args"])
        and isinstance(request.get("env"), dict)
        and all(isinstance(k, str) and isinstance(v, str) for k, v in request["env"].items())
    ):
        return None
    return request


def _fork(request: dict[str, Any], channel: int, gate: int, control: int, supervisor: int, log: Any) -> None:
    try:
        pid = os.fork()
    except OSError as exc:
        log.error("cannot fork a worker", company=request["company"], error=str(exc))
        pid = -1
    if pid == 0:
        _intermediate(request, channel, gate, control, supervisor)
    os.close(channel)
    os.close(gate)
    if pid > 0:
        _, status = os.waitpid(pid, 0)
        if status != 0:
            log.error("cannot fork a worker", company=request["company"],
                      intermediate_exit=os.waitstatus_to_exitcode(status))


def _intermediate(request: dict[str, Any], channel: int, gate: int, control: int, supervisor: int) -> NoReturn:
    """Fork the worker and leave at once: the worker is reparented to the supervisor."""
    try:
        me = os.getpid()
        if os.fork() == 0:
            _worker(request, channel, gate, control, supervisor, me)
    except BaseException:
        os._exit(1)
    os._exit(0)


def _worker(request: dict[str, Any], channel: int, gate: int, control: int, supervisor: int,
            intermediate: int) -> NoReturn:
    try:
        os.close(control)
        deadline = time.monotonic() + 10.0
        while os.getppid() == intermediate:  # it exits right after forking us
            if time.monotonic() > deadline:
                os._exit(1)
            time.sleep(0.0002)
        if os.getppid() != supervisor:
            os._exit(0)  # the supervisor died meanwhile: nobody to work for
        with socket.socket(fileno=gate) as sock:
            sock.sendall(b"%d\n" % os.getpid())
            if sock.recv(1) != ZYGOTE_GO:
                os._exit(0)  # the supervisor gave up on this start
        os.setsid()  # like an exec'd worker: a Ctrl-C on the daemon's terminal is not ours
        gc.enable()  # (bench: off in the zygote while it imported)
        os.environ.clear()
        os.environ.update(request["env"])
        import structlog

        structlog.contextvars.clear_contextvars()
        from whatsappd.worker import __main__ as worker_main

        sys.argv = [str(worker_main.__file__), *request["args"]]  # as in `python -m whatsappd.worker`
    except BaseException:
        os._exit(1)
    code = 1
    try:
        worker_main.run([*request["args"], "--channel-fd", str(channel)])
    except SystemExit as exc:  # argparse refusing the arguments, as in an exec'd worker
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except BaseException:
        traceback.print_exc()
    finally:  # never back into the zygote's loop
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


if __name__ == "__main__":
    sys.exit(main())
