"""The one module of whatsappd that imports neonize: loaded without its import side effects.

Every other module of the engine takes neonize's names from here, so the Go library is loaded
once, in this order, and only in a worker whose engine is neonize (the worker main imports the
engine after configuring logging; `python -X importtime -m whatsappd.worker --engine simulator`
shows no neonize).
"""

from __future__ import annotations

import io
import logging
import os
import subprocess
import warnings


def _import_neonize() -> None:
    """Import neonize without letting its import side effects leak into the process.

    ``import neonize`` calls ``logging.basicConfig(level=INFO)`` (a no-op once the worker main
    configured logging, but not in tests) and runs ``os.popen("uname -a").read()`` twice without
    closing the pipe (a ResourceWarning, and a zombie reaped later). Both are undone here: the
    root logger is restored, and os.popen is replaced for the import by a version that waits.
    """
    root = logging.getLogger()
    saved_level, saved_handlers = root.level, list(root.handlers)
    saved_popen = os.popen

    def closing_popen(cmd: str, mode: str = "r", buffering: int = -1) -> io.StringIO:
        result = subprocess.run(cmd, shell=True, capture_output=True, text=True, check=False)  # noqa: S602
        return io.StringIO(result.stdout)

    try:
        os.popen = closing_popen  # type: ignore[assignment]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ResourceWarning)
            import neonize.client  # noqa: F401  (loads the Go library)
    finally:
        os.popen = saved_popen
        root.setLevel(saved_level)
        for handler in list(root.handlers):
            if handler not in saved_handlers:
                root.removeHandler(handler)


_import_neonize()

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
    MessageSource,
    PairStatus,
    Receipt,
    TemporaryBan,
)
from neonize.proto.waE2E.WAWebProtobufsE2E_pb2 import AudioMessage  # noqa: E402
from neonize.proto.waE2E.WAWebProtobufsE2E_pb2 import Message as WAMessage  # noqa: E402
from neonize.utils.enum import ClientName, MediaType  # noqa: E402
from neonize.utils.jid import Jid2String  # noqa: E402
from neonize.utils.log import log as go_log_level  # noqa: E402

# neonize warns on every connect that ffmpeg is missing. The engine needs none: it builds audio
# messages itself and asks ffprobe (when it is on PATH) only for the duration.
neonize_ffmpeg._ffmpeg_checked = True

__all__ = [
    "JID",
    "AudioMessage",
    "ClientName",
    "ClientOutdatedEv",
    "ConnectFailureEv",
    "ConnectFailureReason",
    "ConnectedEv",
    "DecodeError",
    "DisconnectedEv",
    "DownloadError",
    "IsOnWhatsAppError",
    "Jid2String",
    "KeepAliveRestoredEv",
    "KeepAliveTimeoutEv",
    "LoggedOutEv",
    "LogoutError",
    "MediaType",
    "MessageEv",
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
    "go_log_level",
    "magic",
    "neonize_ffmpeg",
]
