"""GET /v1/events: the journal's backlog after a cursor, then live events, as NDJSON.

The reader subscribes (messaging/sender.py) before the backlog is read, so nothing committed in
between is missed; a seq already written is never written again. A reader that stalls is
dropped at events.write_timeout; one that falls too far behind gets a final `stream.end` line
telling it where to resume.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from typing import Any

from aiohttp import web

from whatsappd.control.bodies import check_company_ids
from whatsappd.control.services import services
from whatsappd.errors import ApiError, ErrorCode
from whatsappd.store import EVENT_TYPES
from whatsappd.timefmt import iso

__all__ = ["events"]

#: Live events written to a stream reader in one go, at most.
_STREAM_BATCH = 1000
#: Several hosts: how many 50 ms waits a cursor ahead of this host's newest seq gets to be caught up.
_CATCH_UP_POLLS = 20

async def events(request: web.Request) -> web.StreamResponse:
    parts = services(request)
    store, messaging = parts.store, parts.messaging
    since_text = request.query.get("since")
    if since_text is not None and not re.fullmatch(r"[0-9]{1,18}", since_text):
        raise ApiError(ErrorCode.BAD_REQUEST, "since must be a sequence number (0 for everything kept)")
    companies = frozenset(request.query.getall("company", []))
    check_company_ids(tuple(companies))
    types = frozenset(request.query.getall("type", []))
    unknown = sorted(types - set(EVENT_TYPES))
    if unknown:
        raise ApiError(ErrorCode.BAD_REQUEST, f"unknown event types {', '.join(unknown)}; known: {', '.join(EVENT_TYPES)}")
    # Subscribe before reading the backlog, so nothing committed in between is missed.
    sub = messaging.subscribe(companies, types)
    try:
        top = store.last_seq
        since = int(since_text) if since_text is not None else top
        if since > top and parts.cluster is not None:
            # A cursor from another host may be a few milliseconds ahead of this host's tail.
            for _ in range(_CATCH_UP_POLLS):
                await asyncio.sleep(0.05)
                top = store.last_seq
                if since <= top:
                    break
        if since > top:
            raise ApiError(ErrorCode.CURSOR_AHEAD, f"since={since} is ahead of the newest event ({top}); the journal "
                           "was reset or the cursor is from another daemon: resume from 0", last_seq=top)
        oldest = await store.oldest_seq()
        if since_text is not None and oldest is not None and 0 < since < oldest - 1:  # 0: all that is kept
            raise ApiError(ErrorCode.SINCE_EXPIRED, f"events after {since} were pruned by the retention policy; "
                           f"the oldest available is {oldest}: resume from {oldest - 1}", oldest_available=oldest)
        response = web.StreamResponse(headers={"Content-Type": "application/x-ndjson", "Cache-Control": "no-store"})
        await response.prepare(request)
        timeout = parts.config().events_write_timeout

        async def write(*lines: bytes) -> None:
            # Several lines go out in one write (one send, one timeout), not one per event.
            await asyncio.wait_for(response.write(b"".join(lines)), timeout)

        def line(item: dict[str, Any]) -> bytes:
            return json.dumps(item, separators=(",", ":")).encode() + b"\n"

        last = since
        try:
            while last < top:
                batch = await store.events_after(last, 1000, companies, types, until=top)
                if not batch:
                    break
                await write(*(event.line() for event in batch))
                last = batch[-1].seq
            last = max(last, top)
            heartbeat = parts.config().events_heartbeat_interval
            while True:
                try:
                    item = sub.queue.get_nowait()
                except asyncio.QueueEmpty:
                    if sub.overflowed:
                        # Cut off: everything buffered has been written, so say so now (not after
                        # a heartbeat interval of silence); it resumes from `last`.
                        item = None
                    else:
                        try:
                            item = await asyncio.wait_for(sub.queue.get(), heartbeat)
                        except TimeoutError:
                            await write(line({"type": "heartbeat", "at": iso(time.time()), "last_seq": last}))
                            continue
                # Take what else is already queued (up to a bound) and write it with this one.
                lines, committed = [], []
                while item is not None:
                    seq, encoded, at = item
                    if seq > last:
                        lines.append(encoded)
                        committed.append(at)
                        last = seq
                    if len(lines) >= _STREAM_BATCH:
                        break
                    try:
                        item = sub.queue.get_nowait()
                    except asyncio.QueueEmpty:
                        break
                if lines:
                    await write(*lines)
                    parts.metrics.observe_stream_lag(committed)
                if item is None:
                    if sub.overflowed:
                        parts.metrics.stream_cutoffs.inc()
                    why = "this reader fell too far behind" if sub.overflowed else "the daemon is stopping"
                    await write(line({"type": "stream.end", "reason": "too_slow" if sub.overflowed else "daemon_stopping",
                                      "resume_from": last, "message": f"{why}; reconnect with since={last}"}))
                    break
        except (TimeoutError, ConnectionResetError):
            # A stalled reader (or one that went away): drop it, never wait for it.
            if request.transport is not None:
                request.transport.close()
        return response
    finally:
        messaging.unsubscribe(sub)
