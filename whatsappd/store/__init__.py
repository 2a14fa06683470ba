"""Durable state of the supervisor: the event journal, the outbox and media.

- backend.py: `StoreBackend`, what the daemon needs from a store, and the errors every backend raises
- journal.py: `Event` rows and the journal's append path (group commit, delivery after commit)
- outbox.py: `OutgoingMessage`, `OutboxMessage`, `MessageStatus` and the allowed status moves
- core.py: the writer thread, group commit, and what a failed write means (full disk, damage)
- sqlite.py: `Store`, the SQLite backend, with all of its SQL
"""

from whatsappd.store.backend import IncomingMedia, StorageFull, StoreBackend, StoreCorrupt, StoredWebhook, StoreError
from whatsappd.store.journal import EVENT_TYPES, CommitListener, Event, Secret
from whatsappd.store.outbox import (
    ALLOWED,
    RECEIPT_RANK,
    STATUSES,
    IdempotencyConflict,
    MessageStatus,
    OutboxMessage,
    OutgoingMessage,
    Payload,
)
from whatsappd.store.sqlite import Store, check_database, corrupt_fix

__all__ = ["ALLOWED", "EVENT_TYPES", "RECEIPT_RANK", "STATUSES", "CommitListener", "Event", "IdempotencyConflict", "IncomingMedia",
           "MessageStatus", "OutboxMessage", "OutgoingMessage", "Payload", "Secret", "StorageFull", "Store",
           "StoreBackend", "StoreCorrupt", "StoreError", "StoredWebhook", "check_database", "corrupt_fix"]
