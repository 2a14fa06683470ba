"""Prometheus metrics: what the daemon exposes, and the optional plain-HTTP listener for it.

- address.py: the `[metrics] listen` setting's parser (light: config.py imports it)
- collector.py: `DaemonMetrics`, one prometheus_client registry per daemon: the per-company
  series table, the histograms, the daemon's counters and process metrics
- listener.py: the TCP listener that serves only the metrics (off unless configured)

Nothing here is imported by config.py or whatsappctl but address.py: prometheus_client is
loaded by the daemon only.
"""
