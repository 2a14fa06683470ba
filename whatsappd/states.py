"""Connection states of a company and the transitions allowed between them.

The supervisor owns the state machine; this module only says what exists and what may follow
what, so that "can a banned company become connected without a retry?" has one answer.
"""

from __future__ import annotations

import enum

__all__ = ["CANNOT_SEND", "RESTING", "SETTLING", "TERMINAL", "TRANSITIONS", "IllegalTransition", "State", "check_transition"]


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


class IllegalTransition(RuntimeError):
    """A bug: the supervisor tried a transition the table does not allow."""


def check_transition(old: State, new: State) -> None:
    if new not in TRANSITIONS[old]:
        raise IllegalTransition(f"{old} -> {new} is not an allowed transition")
