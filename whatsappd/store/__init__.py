"""Durable state of the supervisor: the event journal and the outbox."""
