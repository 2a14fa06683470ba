"""Several whatsappd hosts on one PostgreSQL (issue 13), with `[cluster] enabled = true`.

`leases`: each company's lease (owner, fencing token, local deadline); `registry`: the companies
of every host, in the database; `node`: what wires both into one daemon (the supervisor's
runners follow the leases, workers get a fence deadline, the store a token lookup)."""
