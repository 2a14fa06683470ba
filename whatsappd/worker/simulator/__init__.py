"""The simulator engine: a WhatsApp stand-in for tests and demos, with its session file as its "server"."""
