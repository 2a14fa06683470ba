"""Connection states of a company and the transitions allowed between them.

The supervisor owns the state machine; this module only says what exists and what may follow
what, so that "can a banned company become connected without a retry?" has one answer.
"""

from __future__ import annotations

import enum

__all__ = ["CANNOT_SEND", "FAULTED", "LIVE", "RESTING", "SETTLING", "TERMINAL", "TRANSITIONS", "IllegalTransition",
           "LastError", "State", "check_transition"]


class State(enum.StrEnum):
    STOPPED = "stopped"  # no worker; nothing will happen until connect (or daemon start with a session)
    STARTING = "starting"  # a worker is being started, or waits for the global connect-rate limit
    PAIRING = "pairing"  # a QR or phone code is available; a person must scan
    CONNECTING = "connecting"  # the worker is connecting with stored credentials
    CONNECTED = "connected"
    RECONNECTING = "reconnecting"  # transient failure; attempt and next retry are shown
    LOGGED_OUT = "logged_out"  # the phone unlinked us; the session was wiped; connect shows a QR
    REPLACED = "replaced"  # another client took over; not retried until told
    BANNED = "banned"  # temporary ban; retried at its expiry
    OUTDATED = "outdated"  # client too old; not retried
    FAILED = "failed"  # crash loop or corrupt session; an operator must act


# Groups of states, named once and used everywhere (supervisor's STOPPED_STATES idea).

#: States that no timer leaves: only an operator (connect, restart, logout) does.
TERMINAL = frozenset({State.STOPPED, State.LOGGED_OUT, State.REPLACED, State.OUTDATED, State.FAILED})
#: States in which no worker runs and none is about to: TERMINAL, and a ban waiting for its expiry.
RESTING = TERMINAL | {State.BANNED}
#: States whose session cannot send: messages to such a company are refused, not queued.
CANNOT_SEND = frozenset({State.LOGGED_OUT, State.REPLACED})
#: States an operator act waits through before it can tell what came of it (a QR, a connection).
SETTLING = frozenset({State.STOPPED, State.STARTING, State.CONNECTING})
#: TERMINAL but for a plain stop: the company ended in trouble (or logged out). A start from
#: one begins afresh: crash count and backoff start over.
FAULTED = TERMINAL - {State.STOPPED}
#: A worker runs and gets somewhere on its own: an operator's connect has nothing to add.
LIVE = frozenset({State.CONNECTING, State.PAIRING, State.CONNECTED})

_ENDINGS = {State.LOGGED_OUT, State.REPLACED, State.BANNED, State.OUTDATED, State.FAILED, State.STOPPED}

TRANSITIONS: dict[State, frozenset[State]] = {
    # LOGGED_OUT from a resting state: an operator's logout wipes the session locally.
    State.STOPPED: frozenset({State.STARTING, State.LOGGED_OUT}),
    State.STARTING: frozenset({State.PAIRING, State.CONNECTING, State.CONNECTED, State.RECONNECTING, *_ENDINGS}),
    State.PAIRING: frozenset({State.CONNECTING, State.CONNECTED, State.RECONNECTING, State.STARTING, *_ENDINGS}),
    State.CONNECTING: frozenset({State.PAIRING, State.CONNECTED, State.RECONNECTING, State.STARTING, *_ENDINGS}),
    State.CONNECTED: frozenset({State.RECONNECTING, State.STARTING, *_ENDINGS}),
    State.RECONNECTING: frozenset({State.STARTING, State.CONNECTING, State.CONNECTED, *_ENDINGS}),
    State.LOGGED_OUT: frozenset({State.STARTING, State.STOPPED}),
    State.REPLACED: frozenset({State.STARTING, State.STOPPED, State.LOGGED_OUT}),
    State.BANNED: frozenset({State.STARTING, State.STOPPED, State.LOGGED_OUT}),
    State.OUTDATED: frozenset({State.STARTING, State.STOPPED, State.LOGGED_OUT}),
    State.FAILED: frozenset({State.STARTING, State.STOPPED, State.LOGGED_OUT}),
}


class LastError(enum.StrEnum):
    """The code of a company's `last_error`: why it is not connected (shown to clients, stable)."""

    CONNECTION_FAILED = "connection_failed"  # the connection failed or dropped; retried with backoff
    CONNECT_TIMEOUT = "connect_timeout"  # no connection within reconnect.connect_timeout; retried
    KEEPALIVE = "keepalive"  # reconnecting in vain for too long; the worker was restarted
    WORKER_CRASHED = "worker_crashed"  # the worker died (signal, status, silence); retried
    CRASH_LOOP = "crash_loop"  # it crashed too often within the crash window: failed
    QR_TIMEOUT = "qr_timeout"  # nobody scanned the QR code in time: stopped
    LOGGED_OUT = "logged_out"  # the phone unlinked this device; the session was wiped
    SESSION_DELETED = "session_deleted"  # the session's files were deleted while it ran
    REPLACED = "replaced"  # another client took over these credentials
    BANNED = "banned"  # temporarily banned; retried at the ban's expiry
    OUTDATED = "outdated"  # WhatsApp refuses this client version
    STORE_UNUSABLE = "store_unusable"  # the session store cannot be opened; it was quarantined
    SESSION_LOCKED = "session_locked"  # another process uses this session
    SESSION_PERMISSIONS = "session_permissions"  # the session directory cannot be made private
    BAD_INVOCATION = "bad_invocation"  # the worker refused its arguments (a bug)
    INTERNAL_ERROR = "internal_error"  # a bug in the supervisor; see the log
    NOT_PAIRED = "not_paired"  # the recorded whatsmeow device is gone from the PostgreSQL store


class IllegalTransition(RuntimeError):
    """A bug: the supervisor tried a transition the table does not allow."""


def check_transition(old: State, new: State) -> None:
    if new not in TRANSITIONS[old]:
        raise IllegalTransition(f"{old} -> {new} is not an allowed transition")
