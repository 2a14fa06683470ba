"""Several whatsappd hosts on one PostgreSQL (issue 13). Under construction: `leases` is the
layer the multi-host daemon will sit on; nothing in the daemon uses it yet."""
