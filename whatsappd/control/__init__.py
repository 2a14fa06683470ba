"""The HTTP face of the daemon on its Unix control socket.

app.py builds the application from a `Services` (services.py: the daemon's parts the routes
use). Each request passes middleware.py (peer check, errors -> JSON, body limit and deadline)
and reaches one resource's module: system.py, companies.py, messages.py, events.py, metrics.py,
which read their input with bodies.py. socket_file.py binds the socket file; listener.py admits
connections on it (peers.py says who may); openapi.py is the document served at /v1/openapi.json.
"""
