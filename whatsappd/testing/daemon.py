"""Test helpers: a real daemon subprocess and a real NOTIFY_SOCKET to read what it tells systemd.

First-class code (structlog.testing's habit): the tests and the benchmarks use the same helpers,
no mocks.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from whatsappd.client import Client, DaemonUnavailable

__all__ = [
    "NOBODY", "DaemonProcess", "NotifySocket", "at_once", "clean_env", "ctl_command", "exec_wrapper",
    "run_ctl", "user_switch", "wait_until", "whatsappd_command",
]

#: The unprivileged user that tests running as root use as "a second user" (nobody/nogroup).
NOBODY = 65534

# Run by `exec_wrapper`: optionally move an inherited fd to 3 (where systemd puts the first
# LISTEN_FDS socket), set the named variables to this process's own pid, then exec the real
# command, which therefore keeps that pid (what LISTEN_PID / WATCHDOG_PID must name).
_WRAPPER = """
import os, sys
args = sys.argv[1:]
fd = int(args.pop(0))
names = args.pop(0)
if fd >= 0:
    os.dup2(fd, 3)
    if fd != 3:
        os.close(fd)
for name in filter(None, names.split(",")):
    os.environ[name] = str(os.getpid())
os.execv(args[0], args)
"""


def exec_wrapper(pid_vars: Iterable[str] = (), fd: int | None = None) -> list[str]:
    """A command prefix that sets `pid_vars` to the pid the wrapped command will have, and
    hands `fd` over as fd 3 (pass it with Popen's pass_fds too)."""
    return [sys.executable, "-c", _WRAPPER, str(-1 if fd is None else fd), ",".join(pid_vars)]


@functools.cache
def user_switch(uid: int = NOBODY, gid: int = NOBODY) -> tuple[tuple[str, ...], dict[str, Any]] | None:
    """How to run this Python as uid/gid with no supplementary groups: (command prefix, Popen
    keyword arguments), or None when it cannot be done here (not root, or no way found).

    Popen(user=...) drops root's powers before exec, so an interpreter under a 0700 directory
    (a pyenv build in /root, say) cannot even be found; setpriv switches users too, but the
    kernel resolves the program during the privileged exec. The first way that works is used.
    """
    if os.geteuid() != 0:
        return None
    ways: list[tuple[tuple[str, ...], dict[str, Any]]] = [((), {"user": uid, "group": gid, "extra_groups": []})]
    setpriv = shutil.which("setpriv")
    if setpriv:
        ways.append(((setpriv, f"--reuid={uid}", f"--regid={gid}", "--clear-groups"), {}))
    probe = "import os, whatsappd.client; print(os.getuid(), os.getgid(), os.getgroups())"
    for prefix, popen in ways:
        try:
            result = subprocess.run([*prefix, sys.executable, "-c", probe], capture_output=True, text=True,
                                    timeout=30, cwd="/", env=clean_env(), **popen)
        except OSError:
            continue
        if result.returncode == 0 and result.stdout.split() == [str(uid), str(gid), "[]"]:
            return prefix, popen
    return None


def clean_env(**extra: str) -> dict[str, str]:
    """os.environ without what would make a child believe it runs under systemd, plus extra."""
    env = {
        k: v for k, v in os.environ.items()
        if (not k.startswith(("NOTIFY_", "LISTEN_", "WATCHDOG_", "JOURNAL_STREAM", "WHATSAPPD_"))
            or k == "WHATSAPPD_LOOPBACK_ONLY")  # tests never let a real client dial past loopback
        and k not in ("STATE_DIRECTORY", "RUNTIME_DIRECTORY")
    }
    env.update(extra)
    return env


def ctl_command() -> list[str]:
    """The installed `whatsappctl` console script beside this interpreter, else `python -m`."""
    script = Path(sys.executable).parent / "whatsappctl"
    return [str(script)] if script.exists() else [sys.executable, "-m", "whatsappd.ctl"]


def whatsappd_command() -> list[str]:
    """The installed `whatsappd` console script beside this interpreter, else `python -m`."""
    script = Path(sys.executable).parent / "whatsappd"
    return [str(script)] if script.exists() else [sys.executable, "-m", "whatsappd"]


def run_ctl(*args: str, env: dict[str, str] | None = None, timeout: float = 30, prefix: Iterable[str] = (),
            **popen: Any) -> subprocess.CompletedProcess[str]:
    """Run whatsappctl with args (environment: clean_env() unless given); text output."""
    return subprocess.run([*prefix, *ctl_command(), *args], env=clean_env() if env is None else env,
                          capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL,
                          **popen)


def wait_until(predicate: Callable[[], Any], timeout: float = 10.0, interval: float = 0.02, what: str = "") -> Any:
    """Poll predicate until it returns something truthy; raise TimeoutError naming `what`."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what or predicate}")
        time.sleep(interval)


def at_once(calls: list[Callable[[], Any]], timeout: float = 60.0) -> list[Any]:
    """Run the calls in threads released together (a barrier); their results, in order."""
    barrier = threading.Barrier(len(calls))
    results: list[Any] = [None] * len(calls)

    def run(i: int) -> None:
        barrier.wait()
        results[i] = calls[i]()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(calls))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout)
    return results


class NotifySocket:
    """A bound AF_UNIX datagram socket standing in for systemd's notify socket.

    A thread drains it all the time, as systemd does, so a daemon under test is never held up
    by a full socket queue; the tests read what arrived from `received`.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.1)
        self.received: list[tuple[float, dict[str, str]]] = []  # (monotonic time, fields)
        self._arrived = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._drain, name="notify-socket", daemon=True)
        self._thread.start()

    def _drain(self) -> None:
        while not self._closed:
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                return
            fields = dict(line.split("=", 1) for line in data.decode().splitlines() if "=" in line)
            with self._arrived:
                self.received.append((time.monotonic(), fields))
                self._arrived.notify_all()

    def wait_for(self, key: str, value: str | None = None, timeout: float = 10.0, after: int = 0) -> int:
        """Index (in self.received) of the first message at or after `after` with key (=value)."""
        deadline = time.monotonic() + timeout
        with self._arrived:
            while True:
                for i in range(after, len(self.received)):
                    fields = self.received[i][1]
                    if key in fields and (value is None or fields[key] == value):
                        return i
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(f"no {key}={value or '*'} notification within {timeout}s; got {self.keys()}")
                self._arrived.wait(remaining)

    def collect(self, seconds: float) -> None:
        """Let `seconds` pass (notifications keep arriving in the background)."""
        time.sleep(seconds)

    def keys(self) -> list[str]:
        """Every notification as 'KEY=VALUE' strings, in order (STATUS text kept)."""
        return [f"{k}={v}" for _, fields in list(self.received) for k, v in fields.items()]

    def close(self) -> None:
        self._closed = True
        self._thread.join(1)
        self.sock.close()


class DaemonProcess:
    """`whatsappd run` in a subprocess with a config file under a temporary directory."""

    def __init__(
        self,
        root: Path,
        config: str | None = "",
        env: dict[str, str] | None = None,
        args: Iterable[str] = (),
        notify: NotifySocket | None = None,
        socket_path: Path | None = None,
        prefix: Iterable[str] = (),
        program: Iterable[str] | None = None,
        **popen: Any,
    ) -> None:
        self.root = root
        self.state_dir = root / "state"
        self.socket_path = socket_path or root / "run" / "control.sock"
        self.config_path: Path | None = None
        root.mkdir(parents=True, exist_ok=True)
        if config is not None:
            self.config_path = root / "whatsappd.toml"
            head = (f'[daemon]\nstate_dir = "{self.state_dir}"\nshutdown_timeout = "10s"\n'
                    f'[control]\nsocket_path = "{self.socket_path}"\n')
            self.config_path.write_text(_merge(head, config))
        self.env = clean_env(**(env or {}))
        if notify is not None:
            self.env["NOTIFY_SOCKET"] = str(notify.path)
        self.args = list(args)
        self.prefix = list(prefix)  # e.g. exec_wrapper(...): runs first, then execs the daemon
        self.program = list(program) if program is not None else [sys.executable, "-m", "whatsappd"]
        self.popen = popen
        self.log_path = root / "daemon.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def command(self) -> list[str]:
        cmd = [*self.prefix, *self.program, "run"]
        if self.config_path is not None:
            cmd += ["--config", str(self.config_path)]
        return cmd + self.args

    def start(self, wait: bool = True, timeout: float = 15.0) -> DaemonProcess:
        self.root.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "ab")  # noqa: SIM115 (the child keeps it)
        self.proc = subprocess.Popen(self.command, env=self.env, stdout=log, stderr=log,
                                     stdin=subprocess.DEVNULL, **self.popen)
        log.close()
        if wait:
            self.wait_ready(timeout)
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    @property
    def client(self) -> Client:
        return Client(str(self.socket_path), timeout=30)

    def wait_ready(self, timeout: float = 15.0) -> None:
        def answering() -> bool:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"daemon exited with {self.proc.returncode}:\n{self.logs()}")
            try:
                return self.client.get("/v1/health").ok
            except (DaemonUnavailable, OSError):
                return False

        wait_until(answering, timeout, what="the daemon to answer /v1/health")

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def log_events(self) -> list[dict[str, Any]]:
        """The daemon's log lines parsed as JSON (its format when stderr is a file)."""
        out = []
        for line in self.logs().splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                continue
        return out

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def stop(self, timeout: float = 20.0) -> int:
        """SIGTERM and wait; SIGKILL if it outlives timeout (and fail loudly)."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                raise RuntimeError(f"daemon ignored SIGTERM for {timeout}s:\n{self.logs()}") from None
        return self.proc.returncode

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def _merge(head: str, extra: str) -> str:
    """Put the caller's [daemon]/[control] keys into the head's tables (TOML forbids repeating a table)."""
    sections: dict[str, list[str]] = {}
    order: list[str] = []
    current = ""
    for text in (head, extra):
        for line in text.splitlines():
            stripped = line.strip()
            # [[companies]] and the tables inside its last entry ([companies.pacing]) stay in order, at the end.
            in_array = stripped.startswith("[[") or stripped.startswith("[companies.")
            if stripped.startswith("[") and not in_array:
                current = stripped
                if current not in sections:
                    sections[current] = []
                    order.append(current)
                continue
            if in_array:
                current = ""
                sections.setdefault("__arrays__", [])
                sections["__arrays__"].append(line)
                continue
            if current == "" and sections.get("__arrays__"):
                sections["__arrays__"].append(line)
            elif current:
                key = stripped.split("=", 1)[0].strip()
                sections[current] = [x for x in sections[current] if x.split("=", 1)[0].strip() != key or not key]
                sections[current].append(line)
    out = []
    for name in order:
        out.append(name)
        out.extend(sections[name])
    out.extend(sections.get("__arrays__", []))
    return "\n".join(out) + "\n"
