"""Webhooks (issue 12): journal events POSTed to configured receivers, at least once, in order per
company, signed. spec.py: a webhook's definition and the signature; delivery.py: the delivery tasks.
"""
