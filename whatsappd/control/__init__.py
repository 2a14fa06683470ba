"""The HTTP face of the daemon on its Unix control socket: routes, middleware, the listener, OpenAPI."""
