"""whatsmeow's PostgreSQL store for tests and benchmarks: fake devices, and what neonize loads.

First-class test code like `whatsappd.testing.postgres`. A real pairing needs WhatsApp, so a
device is made the way the cluster research did: a `whatsmeow_device` row written by SQL with
random keys of the right lengths (whatsmeow rebuilds each key pair from its private key, which
any 32 random bytes are for X25519), recorded for a company in `whatsappd_devices`, plus a row
in whatsmeow's Signal sessions table so a wipe can be seen to cascade.

`loaded_jid` starts `python -m whatsappd.worker.neonize.probe` (a worker-side module: started,
never imported here; the request goes as JSON on stdin, so the DSN never goes on argv), which
makes a neonize client exactly as a worker does (`StorePlace.client`), lets it dial a refusing
SOCKS5 listener on 127.0.0.1, and prints the JID of the device neonize loaded: the one fact that
says whose credentials a client would have used.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from whatsappd.testing.scenario import SimDaemon
    from whatsappd.testing.socks5 import Socks5FaultProxy

__all__ = ["cold_start_round", "device_rows", "insert_fake_device", "loaded_jid", "neonize_pg_daemon",
           "quarantines", "record_device", "wait_started"]

_MARK = "LOADED "  # the probe's answer line (whatsappd/worker/neonize/probe.py)


def insert_fake_device(dsn: str, jid: str, push_name: str = "") -> None:
    """A whatsmeow_device row for jid with random keys of whatsmeow's lengths, and one Signal
    session row of that device (whatsmeow_sessions, which cascades from it)."""
    import psycopg

    def key(n: int = 32) -> bytes:
        return secrets.token_bytes(n)

    with psycopg.connect(dsn, autocommit=True) as db, db.transaction():
        db.execute(
            "INSERT INTO whatsmeow_device (jid, registration_id, noise_key, identity_key, signed_pre_key, "
            "signed_pre_key_id, signed_pre_key_sig, adv_key, adv_details, adv_account_sig, adv_account_sig_key, "
            "adv_device_sig, platform, push_name) VALUES (%s, %s, %s, %s, %s, 1, %s, %s, %s, %s, %s, %s, %s, %s)",
            (jid, secrets.randbelow(2**31), key(), key(), key(), key(64), key(), key(16), key(64), key(),
             key(64), "linux", push_name))
        db.execute("INSERT INTO whatsmeow_sessions (our_jid, their_id, session) VALUES (%s, %s, %s)",
                   (jid, "5511911111111.0:0", key(100)))


def record_device(dsn: str, company: str, jid: str) -> None:
    """Record jid as the company's device (what the supervisor does when a pairing succeeds)."""
    import psycopg

    with psycopg.connect(dsn, autocommit=True) as db:
        db.execute("INSERT INTO whatsappd_devices (company, jid) VALUES (%s, %s) ON CONFLICT (company) "
                   "DO UPDATE SET jid = EXCLUDED.jid", (company, jid))


def device_rows(dsn: str) -> dict[str, int]:
    """Each device's JID -> how many rows of whatsmeow's tables are its (the device row included)."""
    import psycopg

    with psycopg.connect(dsn, autocommit=True) as db:
        jids = [str(r[0]) for r in db.execute("SELECT jid FROM whatsmeow_device")]
        sessions: dict[str, int] = {str(j): int(n) for j, n in db.execute(
            "SELECT our_jid, count(*) FROM whatsmeow_sessions GROUP BY our_jid")}
        orphans = {j: n for j, n in sessions.items() if j not in jids}
        return {**{j: 1 + sessions.get(j, 0) for j in jids}, **orphans}


def loaded_jid(dsn: str, company: str, proxy_url: str, *, pair: bool, jid: str | None = None,
               unselected: bool = False, timeout: float = 60.0) -> str | None:
    """The JID of the device a worker's client for company loads (None: a new, unpaired one),
    after its dial through proxy_url (a refusing listener) failed. Runs neonize in a subprocess.

    unselected: make the client as whatsappd did before devices were selected,
    `NewClient(dsn, uuid=company)` (neonize then loads the database's first device)."""
    request = {"dsn": dsn, "company": company, "proxy": proxy_url, "pair": pair, "jid": jid, "unselected": unselected}
    env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}
    proc = subprocess.run([sys.executable, "-m", "whatsappd.worker.neonize.probe"], input=json.dumps(request),
                          capture_output=True, text=True, timeout=timeout, env=env)
    for line in proc.stdout.splitlines():
        if line.startswith(_MARK):
            found: str | None = json.loads(line[len(_MARK):])["jid"]
            return found
    raise RuntimeError(f"the neonize client exited with {proc.returncode}: {proc.stderr.strip()[-2000:]}")


def neonize_pg_daemon(make: Callable[..., SimDaemon], proxy: Socks5FaultProxy, dsn: str, *companies: str,
                      **kw: Any) -> SimDaemon:
    """A scenario daemon (made by make, a daemon_pool's) on the PostgreSQL store dsn, with one
    neonize company per id, each dialing only proxy (a refusing 127.0.0.1 listener)."""
    from whatsappd.testing.scenario import sim_config

    config = sim_config() + "".join(f'[[companies]]\nid = "{cid}"\nengine = "neonize"\nproxy = "{proxy.url}"\n'
                                    for cid in companies)
    return make(config, store={"backend": "postgresql", "dsn": dsn}, **kw)


def wait_started(d: SimDaemon, timeout: float = 60.0) -> SimDaemon:
    """Wait for d's ready line (its socket answers before the supervisor has started)."""
    from whatsappd.testing.daemon import wait_until

    d.wait_ready(timeout)
    wait_until(lambda: d.log_lines("whatsappd ready"), timeout, what="the ready line")
    return d


def cold_start_round(make: Callable[..., SimDaemon], proxy: Socks5FaultProxy, dsn: str, hosts: int = 3,
                     per_host: int = 2) -> list[SimDaemon]:
    """Start `hosts` daemons at once on dsn (an empty database), each with per_host neonize
    companies, all connected at once; return once every company failed its dial at least once
    (or failed for good: a quarantine). The caller stops them."""
    made = [neonize_pg_daemon(make, proxy, dsn, *(f"h{h}c{c}" for c in range(per_host))) for h in range(hosts)]
    for d in made:
        d.start(wait=False)
    for d in made:
        wait_started(d)
    for h, d in enumerate(made):
        for c in range(per_host):
            answer = d.post(f"h{h}c{c}", "connect")
            assert answer.status == 202, answer.body
    for h, d in enumerate(made):
        for c in range(per_host):
            d.wait_state(f"h{h}c{c}", "reconnecting", "failed", timeout=60, check=lambda s: s["last_error"])
    return made


def quarantines(d: SimDaemon, dsn: str) -> int:
    """Companies of d quarantined or failed (a store judged unusable), by its log, its API and the database."""
    import psycopg

    with psycopg.connect(dsn) as db:
        (moved,) = db.execute("SELECT count(*) FROM whatsappd_devices_quarantine").fetchone() or (0,)
    failed = sum(1 for c in d.companies().values() if c["state"] == "failed")
    return len(d.log_lines("store_unusable")) + failed + int(moved)
