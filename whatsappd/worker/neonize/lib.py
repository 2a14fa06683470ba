"""The one module of whatsappd that imports neonize: loaded without its import side effects,
with its Go library (a worker) or without it (a zygote), which then loads it after the fork.

Every other module of the engine takes neonize's names from here, so the Go library is loaded
once, in this order, and only in a worker whose engine is neonize (the worker main imports the
engine after configuring logging; `python -X importtime -m whatsappd.worker --engine simulator`
shows no neonize).

neonize 0.5.2 loads its Go library when ``neonize._binder`` is imported: a module-level block
``if not os.environ.get("SPHINX"):`` calls ``load_goneonize()`` (``ctypes.CDLL``), declares
the ctypes signature of every Go function, and binds ``gocode``; with ``SPHINX`` set (neonize's
switch for building its documentation) the block is skipped and ``gocode`` is a bare object.

A zygote (worker/zygote.py) must never load the library: the Go runtime starts threads, which
do not survive ``fork()``, and a child forked from a process that had loaded it never dials
(measured). So the zygote sets ``whatsappd.worker.neonize.GO_LIBRARY_AT_IMPORT`` to False
before it imports this module, which then imports neonize's Python side with ``SPHINX`` set
(``import_neonize(library=False)``); each forked worker runs that same block itself
(``load_library()``, called by the worker main), in the module's own namespace, so the
signatures refer to the very ctypes classes the rest of neonize already uses.

Two other import side effects are undone here, in every mode: ``import neonize`` calls
``logging.basicConfig(level=INFO)`` (a no-op once the worker main configured logging, but not
in tests) and runs ``os.popen("uname -a")`` twice without closing the pipe (a ResourceWarning,
and a zombie reaped later); and ``neonize.utils.log`` starts a thread that forwards whatsmeow's
log lines, which a zygote stops before it forks and each worker starts again (``load_library``).
"""

from __future__ import annotations

import ast
import contextlib
import ctypes
import io
import logging
import os
import subprocess
import sys
import threading
import types
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from whatsappd.worker import neonize as _package

_SWITCH = "SPHINX"


class NeonizeLayoutError(RuntimeError):
    """The installed neonize is not laid out as this module expects (another release?)."""


class _NotLoaded:
    """Stands for neonize's Go library in a process that has not loaded it (a zygote)."""

    def __getattr__(self, name: str) -> Any:
        raise RuntimeError(f"neonize's Go library is not loaded in this process (wanted {name}); "
                           "a zygote never loads it, its workers do after the fork")

    def __repr__(self) -> str:
        return "<neonize Go library: not loaded>"


@dataclass
class _Loader:
    """neonize/_binder.py's loading block, compiled once in the zygote (before it forks, so no
    worker pays for parsing it): `setup` loads the library and binds `gocode`; `signatures`
    holds the block's ~190 `gocode.F.attr = value` lines by function, applied when a worker
    first uses F (a worker uses a dozen of the ~100 functions; building them all would copy
    about 0.7 MiB of the zygote's heap into each worker)."""

    setup: types.CodeType
    signatures: dict[str, list[tuple[str, types.CodeType]]] = field(default_factory=dict)


_loader: _Loader | None = None
_stand_in: _NotLoaded | None = None
#: False: load_library() gives every function its signature at once, as neonize does
#: (bench/bench_zygote.py measures what on-use signatures save).
SIGNATURES_ON_USE = True
#: What the loading block's os.popen calls print, run once in the zygote: in a forked worker a
#: subprocess alone would copy ~0.6 MiB of the zygote's heap (subprocess's code and objects).
_popen_output: dict[str, str] = {}


def _run(cmd: str) -> str:
    result = subprocess.run(cmd, shell=True, capture_output=True, text=True, check=False)  # noqa: S602
    _popen_output[cmd] = result.stdout
    return result.stdout


@contextlib.contextmanager
def _undo_import_side_effects() -> Iterator[None]:
    root = logging.getLogger()
    saved_level, saved_handlers = root.level, list(root.handlers)
    saved_popen = os.popen

    def closing_popen(cmd: str, mode: str = "r", buffering: int = -1) -> io.StringIO:
        return io.StringIO(_popen_output[cmd] if cmd in _popen_output else _run(cmd))

    try:
        os.popen = closing_popen  # type: ignore[assignment]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ResourceWarning)
            yield
    finally:
        os.popen = saved_popen
        root.setLevel(saved_level)
        for handler in list(root.handlers):
            if handler not in saved_handlers:
                root.removeHandler(handler)


def _loading_block(path: str) -> _Loader:
    """The body of ``if not os.environ.get("SPHINX"):`` in neonize/_binder.py, compiled."""
    with open(path, encoding="utf-8") as source:
        tree = ast.parse(source.read(), path)
    for node in tree.body:
        if isinstance(node, ast.If) and _SWITCH in ast.dump(node.test) and any(
            isinstance(n, ast.Name) and n.id == "gocode" for stmt in node.body for n in ast.walk(stmt)
        ):
            return _split_block(node.body, path)
    raise NeonizeLayoutError(f"{path} has no `if not os.environ.get({_SWITCH!r})` block binding gocode")


def _split_block(body: list[ast.stmt], path: str) -> _Loader:
    """Setup statements apart from per-function signature lines, which are of two shapes:
    `gocode.F.attr = value`, and `for f in ("F", ...): getattr(gocode, f).attr = value`."""
    setup: list[ast.stmt] = []
    lines: list[tuple[str, str, ast.expr]] = []
    for stmt in body:
        line = _signature_line(stmt)
        if line is not None:
            lines.append(line)
        elif (isinstance(stmt, ast.For) and isinstance(stmt.target, ast.Name) and isinstance(stmt.iter, ast.Tuple)
              and all(isinstance(e, ast.Constant) and isinstance(e.value, str) for e in stmt.iter.elts)
              and len(stmt.body) == 1 and not stmt.orelse
              and (loop_line := _signature_line(_unless_missing(stmt.body[0]), loop_var=stmt.target.id)) is not None):
            lines += [(str(e.value), loop_line[1], loop_line[2]) for e in stmt.iter.elts  # type: ignore[attr-defined]
                      ]
        else:
            setup.append(stmt)
    # Every signature's value is evaluated later, in the module's namespace: only the setup may
    # define what they use, so a value must not refer to a name the block binds after it.
    loader = _Loader(compile(ast.Module(body=setup, type_ignores=[]), path, "exec"))
    for function, attr, value in lines:
        code = compile(ast.Expression(body=value), path, "eval")
        loader.signatures.setdefault(function, []).append((attr, code))
    return loader


def _unless_missing(stmt: ast.stmt) -> ast.stmt:
    """The statement inside `try: STMT except AttributeError: pass` (a function the library may
    lack: on use such a function does not exist either), else stmt itself."""
    if (isinstance(stmt, ast.Try) and len(stmt.body) == 1 and len(stmt.handlers) == 1 and not stmt.orelse
            and not stmt.finalbody and isinstance(stmt.handlers[0].type, ast.Name)
            and stmt.handlers[0].type.id == "AttributeError" and stmt.handlers[0].name is None
            and len(stmt.handlers[0].body) == 1 and isinstance(stmt.handlers[0].body[0], ast.Pass)):
        return stmt.body[0]
    return stmt


def _signature_line(stmt: ast.stmt, loop_var: str | None = None) -> tuple[str, str, ast.expr] | None:
    """(function, attribute, value) for `gocode.F.attr = value`, or (with loop_var) for
    `getattr(gocode, loop_var).attr = value`; None for any other statement."""
    if not (isinstance(stmt, ast.Assign) and len(stmt.targets) == 1 and isinstance(stmt.targets[0], ast.Attribute)):
        return None
    target, holder = stmt.targets[0], stmt.targets[0].value
    if loop_var is None:
        if isinstance(holder, ast.Attribute) and isinstance(holder.value, ast.Name) and holder.value.id == "gocode":
            return holder.attr, target.attr, stmt.value
        return None
    if (isinstance(holder, ast.Call) and isinstance(holder.func, ast.Name) and holder.func.id == "getattr"
            and len(holder.args) == 2 and not holder.keywords
            and isinstance(holder.args[0], ast.Name) and holder.args[0].id == "gocode"
            and isinstance(holder.args[1], ast.Name) and holder.args[1].id == loop_var):
        return "", target.attr, stmt.value
    return None


class _SignedOnUse(ctypes.CDLL):
    """The loaded library, each function given its signature from the block on first use."""

    _signatures: dict[str, list[tuple[str, types.CodeType]]] = {}
    _namespace: dict[str, Any] = {}
    _lock = threading.Lock()

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") and name.endswith("__"):
            raise AttributeError(name)
        with self._lock:
            if name in self.__dict__:  # another thread was first
                return self.__dict__[name]
            func = self[name]
            for attr, value in self._signatures.get(name, ()):
                setattr(func, attr, eval(value, self._namespace))  # noqa: S307  (neonize's own code)
            setattr(self, name, func)
            return func

    def sign_loaded(self) -> None:
        """Functions the setup already looked up (outside the signature lines) get theirs now."""
        for name, func in list(self.__dict__.items()):
            if isinstance(func, self._FuncPtr):
                for attr, value in self._signatures.get(name, ()):
                    setattr(func, attr, eval(value, self._namespace))  # noqa: S307


def import_neonize(library: bool = True) -> None:
    """Import neonize (``neonize.client`` and what it imports) without its side effects.

    library=False (a zygote): the Go library is not loaded; ``load_library()`` loads it later.
    A second call does nothing. Raises NeonizeLayoutError if neonize cannot be imported that way.
    """
    global _loader, _stand_in
    if "neonize.client" in sys.modules:
        return
    with _undo_import_side_effects():
        if library:
            import neonize.client  # noqa: F401  (loads the Go library)
            return
        saved = os.environ.get(_SWITCH)
        os.environ[_SWITCH] = "1"
        try:
            import neonize._binder as binder
            import neonize.client  # noqa: F401
        finally:
            if saved is None:
                del os.environ[_SWITCH]
            else:
                os.environ[_SWITCH] = saved
    if isinstance(binder.gocode, ctypes.CDLL):
        raise NeonizeLayoutError(f"neonize loaded its Go library although {_SWITCH} was set")
    _loader = _loading_block(str(binder.__file__))
    with _undo_import_side_effects():
        binder.generated_name()  # the library's file name: records the `uname -a` it runs
    _stand_in = _NotLoaded()
    _rebind(binder.gocode, _stand_in)
    _stop_log_thread()


def library_loaded() -> bool:
    """True if neonize is imported with its Go library loaded in this process."""
    binder = sys.modules.get("neonize._binder")
    return binder is not None and isinstance(getattr(binder, "gocode", None), ctypes.CDLL)


def load_library() -> None:
    """Load the Go library that import_neonize(library=False) left out (in a zygote's child).

    Does nothing where neonize was imported with its library, or not imported at all (the
    worker's own import then loads it).
    """
    global _loader, _stand_in
    if _loader is None or _stand_in is None:
        return
    binder = sys.modules["neonize._binder"]
    with _undo_import_side_effects():
        exec(_loader.setup, binder.__dict__)  # noqa: S102  (neonize's own code, in its own module)
    library = binder.gocode
    if not SIGNATURES_ON_USE:
        for name, lines in _loader.signatures.items():
            try:
                func = getattr(library, name)
            except AttributeError:
                continue  # not in this build of the library (neonize skips it too)
            for attr, value in lines:
                setattr(func, attr, eval(value, binder.__dict__))  # noqa: S307
    elif type(library) is ctypes.CDLL and _loader.signatures:
        _SignedOnUse._signatures, _SignedOnUse._namespace = _loader.signatures, binder.__dict__
        library.__class__ = _SignedOnUse
        library.sign_loaded()
    _rebind(_stand_in, library)
    _loader = _stand_in = None
    _start_log_thread()


#: The neonize modules that bind `gocode` (client.py imports it by name). Named, not found by
#: walking sys.modules: in a zygote's child that walk alone copies ~1 MiB (each module's refcount).
_GOCODE_HOLDERS = ("neonize._binder", "neonize.client", "neonize.aioze.client")


def _rebind(old: object, new: object) -> None:
    """Point every neonize module's `gocode` that is `old` at `new`."""
    for name in _GOCODE_HOLDERS:
        module = sys.modules.get(name)
        if module is not None and getattr(module, "gocode", None) is old:
            module.gocode = new  # type: ignore[attr-defined]


def _stop_log_thread() -> None:
    """End neonize's log-forwarding thread (it waits on a queue): a zygote keeps no thread."""
    log_module = sys.modules.get("neonize.utils.log")
    thread = getattr(log_module, "_thread", None)
    if isinstance(thread, threading.Thread) and thread.is_alive():
        log_module._log_queue.put(None)  # type: ignore[union-attr]  # its worker's end sentinel
        thread.join(5)
        if thread.is_alive():
            raise NeonizeLayoutError("neonize's log thread did not end on its sentinel")


def _start_log_thread() -> None:
    log_module = sys.modules.get("neonize.utils.log")
    thread = getattr(log_module, "_thread", None)
    if log_module is not None and isinstance(thread, threading.Thread) and not thread.is_alive():
        log_module._thread = threading.Thread(target=log_module._worker, daemon=True)  # type: ignore[attr-defined]
        log_module._thread.start()


# Imported with its Go library, unless a zygote imports this module (the library is then loaded
# after the fork, by the worker main: load_library()).
import_neonize(library=_package.GO_LIBRARY_AT_IMPORT)

import magic  # noqa: E402  (python-magic, a neonize dependency: its builders sniff with it)
import neonize.utils.ffmpeg as neonize_ffmpeg  # noqa: E402
from google.protobuf.message import DecodeError  # noqa: E402
from neonize._binder import ProxySettings  # noqa: E402
from neonize.client import NewClient  # noqa: E402
from neonize.events import (  # noqa: E402
    ClientOutdatedEv,
    ConnectedEv,
    ConnectFailureEv,
    DisconnectedEv,
    KeepAliveRestoredEv,
    KeepAliveTimeoutEv,
    LoggedOutEv,
    MessageEv,
    PairStatusEv,
    ReceiptEv,
    StreamErrorEv,
    StreamReplacedEv,
    TemporaryBanEv,
)
from neonize.exc import (  # noqa: E402
    DownloadError,
    IsOnWhatsAppError,
    LogoutError,
    NeonizeError,
    PairPhoneError,
    SendMessageError,
    UploadError,
)
from neonize.proto.Neonize_pb2 import (  # noqa: E402
    JID,
    ConnectFailureReason,
    MessageInfo,
    MessageSource,
    PairStatus,
    Receipt,
    TemporaryBan,
)
from neonize.proto.waE2E.WAWebProtobufsE2E_pb2 import AudioMessage, ExtendedTextMessage  # noqa: E402
from neonize.proto.waE2E.WAWebProtobufsE2E_pb2 import Message as WAMessage  # noqa: E402
from neonize.utils.enum import ChatPresence, ChatPresenceMedia, ClientName, MediaType  # noqa: E402
from neonize.utils.jid import Jid2String  # noqa: E402
from neonize.utils.log import log as go_log_level  # noqa: E402

# neonize warns on every connect that ffmpeg is missing. The engine needs none: it builds audio
# messages itself and asks ffprobe (when it is on PATH) only for the duration.
neonize_ffmpeg._ffmpeg_checked = True

__all__ = [
    "JID",
    "AudioMessage",
    "ChatPresence",
    "ChatPresenceMedia",
    "ClientName",
    "ClientOutdatedEv",
    "ConnectFailureEv",
    "ConnectFailureReason",
    "ConnectedEv",
    "DecodeError",
    "DisconnectedEv",
    "DownloadError",
    "ExtendedTextMessage",
    "IsOnWhatsAppError",
    "Jid2String",
    "KeepAliveRestoredEv",
    "KeepAliveTimeoutEv",
    "LoggedOutEv",
    "LogoutError",
    "MediaType",
    "MessageEv",
    "MessageInfo",
    "MessageSource",
    "NeonizeError",
    "NewClient",
    "PairPhoneError",
    "PairStatus",
    "PairStatusEv",
    "ProxySettings",
    "Receipt",
    "ReceiptEv",
    "SendMessageError",
    "StreamErrorEv",
    "StreamReplacedEv",
    "TemporaryBan",
    "TemporaryBanEv",
    "UploadError",
    "WAMessage",
    "NeonizeLayoutError",
    "go_log_level",
    "import_neonize",
    "library_loaded",
    "load_library",
    "magic",
    "neonize_ffmpeg",
]
