"""The interface every engine (real neonize, simulator) offers to the worker main.

The worker main owns the process: umask, session lock, parent-death signal, the channel and
the heartbeat. An engine owns one WhatsApp client and nothing else. Commands reach it typed and
already valid (protocol.parse_command): an engine checks only what depends on its own state.
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from whatsappd.protocol import Command, EngineError, Op, parse_command
from whatsappd.worker.gate import ConnectGate

__all__ = ["Emit", "Engine", "EngineError", "EngineOptions"]

#: Sends one message to the supervisor. The worker main adds "company"; the engine gives
#: "type" and the fields of that type (protocol.py's `to_wire()`). Thread-safe.
Emit = Callable[[dict[str, Any]], None]


@dataclass(frozen=True)
class EngineOptions:
    company: str
    session_dir: Path  # exists, 0700, locked by this process
    proxy: str | None  # e.g. "socks5://127.0.0.1:1080"; None = direct
    pair: bool  # True: no session yet, start pairing (QR); False: restore the stored session
    #: Every connection attempt (the first and every reconnect) passes it first; an engine that
    #: ends closes it. The default lets every attempt through (no supervisor: unit tests).
    gate: ConnectGate = field(default_factory=ConnectGate.unlimited)
    #: The simulator only: `[simulator] server_dir`, the fake WhatsApp shared by several daemons
    #: (the company's device, send log and connection log are in server_dir/<company>/). None:
    #: everything is in session_dir.
    server_dir: Path | None = None


class Engine(abc.ABC):
    """One WhatsApp client. run() blocks in the worker's main thread."""

    #: The engine's name, as in `--engine` and the hello message.
    name: ClassVar[str]
    #: The commands it carries out; any other is unknown_op.
    ops: ClassVar[frozenset[Op]]
    #: The files in the session directory that hold the credentials. Once one existed, its
    #: disappearing means the session was deleted under the worker (the worker main watches).
    session_files: ClassVar[tuple[str, ...]] = ()

    def __init__(self, options: EngineOptions, emit: Emit) -> None:
        self.options = options
        self.emit = emit

    def parse(self, message: dict[str, Any]) -> Command:
        """The typed command of a decoded `command` message; EngineError if it is not valid here."""
        return parse_command(message, self.ops, self.name)

    def command(self, op: str, args: Any) -> dict[str, Any]:
        """Parse and carry out one command given by its op and arguments (EngineError)."""
        return self.execute(self.parse({"type": "command", "op": op, "args": args}))

    @abc.abstractmethod
    def run(self) -> int:
        """Connect and serve until stopped or a terminal event; return a protocol.ExitCode."""

    @abc.abstractmethod
    def execute(self, command: Command) -> dict[str, Any]:
        """Carry out one valid command (called from another thread); raise EngineError."""

    @abc.abstractmethod
    def stop(self) -> None:
        """Disconnect cleanly; run() then returns ExitCode.STOPPED. Called from another thread."""
