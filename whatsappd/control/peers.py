"""Who is on the other end of a control connection, and whether they may use the API.

Peer credentials (SO_PEERCRED) are read when a connection is accepted (listener.py) and again
for each request (middleware.py), since a reload may narrow control.allowed_uids / allowed_groups.
"""

from __future__ import annotations

import asyncio
import os
import pwd
import socket
import struct
from dataclasses import dataclass

from whatsappd.config import Config
from whatsappd.errors import ApiError, ErrorCode

__all__ = ["PeerCred", "admits", "forbidden", "peer_of"]


@dataclass(frozen=True)
class PeerCred:
    pid: int
    uid: int
    gid: int

    def fields(self) -> dict[str, int]:
        """How a log line names the peer."""
        return {"peer_pid": self.pid, "peer_uid": self.uid}


def peer_of(transport: asyncio.BaseTransport | None) -> PeerCred | None:
    """SO_PEERCRED of a connection (None on a socket that has no peer credentials)."""
    sock = transport.get_extra_info("socket") if transport is not None else None
    if sock is None or sock.family != socket.AF_UNIX:
        return None
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    except OSError:  # already gone
        return None
    return PeerCred(*struct.unpack("3i", raw))


def _user_groups(uid: int, gid: int) -> set[int]:
    try:
        entry = pwd.getpwuid(uid)
    except KeyError:
        return {gid}
    return {gid, *os.getgrouplist(entry.pw_name, entry.pw_gid)}


def admits(config: Config, cred: PeerCred | None) -> bool:
    """Whether control.allowed_uids / allowed_groups let this peer use the API."""
    uids, gids = config.control_allowed_uids, config.control_allowed_groups
    if not uids and not gids:
        return True  # the socket file's mode and group are the only gate
    if cred is None:
        return False
    if cred.uid in (0, os.getuid()) or cred.uid in uids:
        return True
    return bool(gids) and not _user_groups(cred.uid, cred.gid).isdisjoint(gids)


def forbidden(cred: PeerCred | None) -> ApiError:
    return ApiError(ErrorCode.FORBIDDEN, f"uid {cred.uid if cred else '?'} may not use this API; add it to "
                    "control.allowed_uids or one of its groups to control.allowed_groups")
