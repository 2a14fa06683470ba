"""`Messaging`: what the control API uses of messaging, and the parts' start and stop.

daemon.py builds the parts and wires the event path (see bus.py); this object only gathers
them for the control API (live readers, enqueue, waiting for a status) and for the daemon's
start and shutdown.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from whatsappd.messaging.bus import EventBus, Subscriber
from whatsappd.messaging.maintenance import Maintenance
from whatsappd.messaging.sender import OutboxSender
from whatsappd.store import OutboxMessage, OutgoingMessage, StoreBackend

__all__ = ["Messaging"]


class Messaging:
    def __init__(self, store: StoreBackend, bus: EventBus, sender: OutboxSender, maintenance: Maintenance) -> None:
        self.store = store
        self.bus = bus
        self.sender = sender
        self.maintenance = maintenance

    def start(self) -> None:
        """Once the store is open: a sender per company, and the maintenance rounds."""
        self.sender.start()
        self.maintenance.start()

    async def close(self) -> None:
        """End the live streams, stop sending and maintenance, and commit what is pending."""
        self.bus.close()
        await asyncio.gather(self.sender.close(), self.maintenance.close())
        await self.store.flush()

    # ------------------------------------------------------------------- for the control API

    @property
    def subscribers(self) -> set[Subscriber]:
        return self.bus.subscribers

    def subscribe(self, companies: frozenset[str], types: frozenset[str]) -> Subscriber:
        return self.bus.subscribe(companies, types)

    def unsubscribe(self, sub: Subscriber) -> None:
        self.bus.unsubscribe(sub)

    async def enqueue(self, message: OutgoingMessage) -> tuple[bool, OutboxMessage]:
        return await self.sender.enqueue(message)

    async def wait_status(self, company: str, message_id: str, done: Callable[[OutboxMessage], bool],
                          timeout: float) -> OutboxMessage | None:
        return await self.bus.wait_status(company, message_id, done, timeout)

    # ------------------------------------------------------------------------------ pacing

    def pacing(self, company: str) -> dict[str, Any]:
        """The company's sending: {"state": "active" | "paced" | "paused", "until", "reason"}."""
        return self.sender.pacing(company)

    async def resume_sending(self, company: str, who: dict[str, Any]) -> bool:
        """End the company's rate-limit pause now (who: the caller, logged); False: it was not paused."""
        return await self.sender.resume(company, who)

    def pacing_delay(self, company: str) -> float:
        return self.sender.pacing_delay(company)

    def with_pacing(self, message: OutboxMessage) -> OutboxMessage:
        return self.sender.with_pacing(message)
