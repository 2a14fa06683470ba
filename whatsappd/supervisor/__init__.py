"""Company supervision: one runner per company, its worker process, backoff and the runtime registry."""
