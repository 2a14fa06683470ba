"""The journal's fan-out to live readers and the outbox sender."""
