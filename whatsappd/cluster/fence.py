"""StaleLease, in a module of its own that needs no psycopg: the outbox sender catches it, and a
SQLite daemon (no cluster) must not import the PostgreSQL driver for that."""

from __future__ import annotations

__all__ = ["NO_TOKEN", "StaleLease"]

#: The token of a write by a host holding no lease for the company (real tokens start at 1).
NO_TOKEN = 0


class StaleLease(Exception):
    """A write for a company carried a token that is not (or no longer) its live lease's."""

    def __init__(self, company: str, token: int, current: int | None, owner: str | None, live: bool) -> None:
        self.company, self.token, self.current, self.owner, self.live = company, token, current, owner, live
        if token == NO_TOKEN:
            now = "this host holds no lease for it"
        elif current is None:
            now = "there is no lease row for it"
        elif current != token:
            now = f"the lease is now token {current}, held by {owner or 'nobody'}"
        else:
            now = "that lease has expired"
        super().__init__(f"company {company!r}: lease token {token} is stale ({now}); this host no longer owns "
                         "the company and must not write for it")
