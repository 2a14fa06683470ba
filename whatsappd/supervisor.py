"""The supervisor: one runner per company, each owning its state.

This first version keeps the registry of companies (from the config) and their states; the
worker processes are added on top of the same interface.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from whatsappd.config import CompanyConfig, Config, ConfigDiff
from whatsappd.logs import get_logger
from whatsappd.states import State, check_transition

__all__ = ["CompanyRuntime", "Supervisor"]

log = get_logger()


@dataclass
class CompanyRuntime:
    config: CompanyConfig
    state: State = State.STOPPED
    since: float = field(default_factory=time.time)

    @property
    def id(self) -> str:
        return self.config.id

    def transition(self, new: State, reason: str) -> None:
        check_transition(self.state, new)
        old, self.state, self.since = self.state, new, time.time()
        log.info("state changed", company=self.id, old=str(old), new=str(new), reason=reason)

    def snapshot(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "name": self.config.name,
            "engine": self.config.engine,
            "state": str(self.state),
            "since": _iso(self.since),
        }


def _iso(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


class Supervisor:
    def __init__(self, config: Config, on_change: Callable[[], None] = lambda: None) -> None:
        self.config = config
        self.on_change = on_change
        self.companies: dict[str, CompanyRuntime] = {c.id: CompanyRuntime(c) for c in config.companies}

    async def start(self) -> None:
        """Start what should run at daemon start."""

    async def shutdown(self, timeout: float) -> None:
        """Stop every worker within timeout seconds."""

    async def kill_all(self) -> None:
        """SIGKILL every worker at once (forced shutdown)."""

    async def apply(self, config: Config, diff: ConfigDiff) -> None:
        """Apply a reloaded config: only the companies in the diff are touched."""
        self.config = config
        for cid in diff.removed:
            self.companies.pop(cid, None)
            log.info("company removed by reload", company=cid)
        for cid in diff.added:
            company = config.company(cid)
            assert company is not None
            self.companies[cid] = CompanyRuntime(company)
            log.info("company added by reload", company=cid)
        for cid in diff.changed:
            company = config.company(cid)
            assert company is not None
            self.companies[cid].config = company
            log.info("company changed by reload", company=cid)

    def counts(self) -> dict[str, int]:
        return dict(Counter(str(c.state) for c in self.companies.values()))

    def list(self) -> list[dict[str, Any]]:
        return [self.companies[cid].snapshot() for cid in sorted(self.companies)]

    def status_line(self) -> str:
        total = len(self.companies)
        if not total:
            return "no companies configured"
        connected = sum(1 for c in self.companies.values() if c.state is State.CONNECTED)
        return f"{connected}/{total} connected"
