"""The company registry of a cluster: every company of every host, in PostgreSQL.

With `[cluster] enabled = true` it replaces STATE_DIR/companies.json (supervisor/registry.py's
RuntimeRegistry, whose interface it keeps: load, get, put, remove): one row per company in
`whatsappd_companies` with its `[[companies]]` table as JSON, where it came from (`config`: a
host's config file, upserted at start and reload; `runtime`: PUT /v1/companies) and what the
operator wants of it (`desired`: run or stop, so an operator's stop survives a failover). Every
company has a lease row (cluster/leases.py), inserted with it; removing a company removes its
lease row at the next read of the registry (within a renew period), so the owner's last events
for it still commit under its lease. Every host reads the table again each renew period (cluster/node.py), so a company
added or removed on one host appears or disappears on all.

Calls are short synchronous statements on one autocommit connection of its own (reconnected on
the next call after an error), like the file registry's writes; `rows()` runs on a thread.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg.rows import TupleRow

from whatsappd.config import CompanyConfig, parse_companies
from whatsappd.logs import get_logger
from whatsappd.supervisor.registry import RegistryError

__all__ = ["MIGRATION", "ClusterRegistry", "Registered"]

log = get_logger()

#: Schema version 5 (store/postgresql.py MIGRATIONS): the registry, and the outbox's claim token.
MIGRATION = """
CREATE TABLE whatsappd_companies (
    company text PRIMARY KEY,
    config json NOT NULL,                   -- its [[companies]] table (CompanyConfig.to_toml())
    source text NOT NULL,                   -- 'config' (a host's config file) or 'runtime' (the API)
    desired text NOT NULL DEFAULT 'run',    -- 'run' or 'stop': the operator's last act
    updated_at timestamptz NOT NULL DEFAULT now()
);
ALTER TABLE whatsappd_messages ADD COLUMN claim bigint;   -- lease token of the claim (queued -> sending)
"""

_UPSERT = """
WITH up AS (
    INSERT INTO whatsappd_companies (company, config, source) VALUES (%(company)s, %(config)s::json, %(source)s)
    ON CONFLICT (company) DO UPDATE SET config = EXCLUDED.config, source = EXCLUDED.source, updated_at = now()
)
INSERT INTO whatsappd_company_leases (company) VALUES (%(company)s) ON CONFLICT (company) DO NOTHING
"""


#: Every company; and the lease rows of companies removed from the registry go (one statement).
_ROWS = """
WITH orphans AS (
    DELETE FROM whatsappd_company_leases AS l
    WHERE NOT EXISTS (SELECT 1 FROM whatsappd_companies AS c WHERE c.company = l.company)
)
SELECT company, config, source, desired FROM whatsappd_companies ORDER BY company
"""


@dataclass(frozen=True)
class Registered:
    """One registry row."""

    company: CompanyConfig
    source: str  # "config" or "runtime"
    run: bool  # desired: run (True) or stop (an operator's stop)


class ClusterRegistry:
    """The company registry in PostgreSQL (see the module doc)."""

    def __init__(self, dsn: str) -> None:
        self.dsn = dsn
        self._db: psycopg.Connection[TupleRow] | None = None
        self._lock = threading.Lock()  # the loop's calls and rows() on a thread share the connection
        self._runtime: dict[str, CompanyConfig] = {}

    def _run(self, sql: str, params: Any = None, many: Iterable[Any] | None = None) -> list[TupleRow]:
        with self._lock:
            if self._db is None or self._db.closed or self._db.broken:
                self._db = psycopg.connect(self.dsn, autocommit=True, connect_timeout=10)
            try:
                if many is not None:
                    with self._db.transaction(), self._db.cursor() as cur:
                        cur.executemany(sql, list(many))
                    return []
                cur = self._db.execute(sql, params)
                return cur.fetchall() if cur.description is not None else []
            except psycopg.Error:
                self._db.close()
                self._db = None
                raise

    def close(self) -> None:
        with self._lock:
            if self._db is not None:
                self._db.close()
                self._db = None

    # ----------------------------------------------------------- RuntimeRegistry's interface

    def load(self) -> list[CompanyConfig]:
        """The companies added at runtime (the config file's are upserted by upsert_config)."""
        try:
            rows = self.rows()
        except psycopg.Error as exc:
            raise RegistryError(f"cannot read the company registry (whatsappd_companies): {exc}") from exc
        return [r.company for r in rows.values() if r.source == "runtime"]

    def get(self, company_id: str) -> CompanyConfig | None:
        """The company as added at runtime (None for a config file's, or an unknown one)."""
        return self._runtime.get(company_id)

    def put(self, company: CompanyConfig) -> None:
        self._upsert([company], "runtime")
        self._runtime[company.id] = company

    def remove(self, company_id: str) -> None:
        """Remove the company: every host forgets it at its next read, and its lease row goes then
        (rows()), so the owner's last events for it (its stop) still commit under its lease."""
        self._run("DELETE FROM whatsappd_companies WHERE company = %s", (company_id,))
        self._runtime.pop(company_id, None)

    # ----------------------------------------------------------------------- the cluster's

    def upsert_config(self, companies: Iterable[CompanyConfig]) -> None:
        """The config file's [[companies]] (at start and reload), each with its lease row."""
        self._upsert(list(companies), "config")

    def _upsert(self, companies: list[CompanyConfig], source: str) -> None:
        if companies:
            self._run(_UPSERT, many=({"company": c.id, "config": json.dumps(c.to_toml()), "source": source}
                                     for c in companies))
            if source == "config":
                for company in companies:
                    self._runtime.pop(company.id, None)

    def desire(self, company_id: str, run: bool) -> None:
        """Record the operator's last act on the company: run (connect) or stop."""
        self._run("UPDATE whatsappd_companies SET desired = %s, updated_at = now() WHERE company = %s",
                  ("run" if run else "stop", company_id))

    def rows(self) -> dict[str, Registered]:
        """Every registered company (a row that no longer parses is skipped with an error logged)."""
        out: dict[str, Registered] = {}
        for company, config, source, desired in self._run(_ROWS):
            problems: list[str] = []
            parsed = parse_companies([config if isinstance(config, dict) else json.loads(config)], problems)
            if problems or not parsed or parsed[0].id != company:
                log.error("a company in the registry is unusable; skipped", company=company, problems=problems)
                continue
            out[company] = Registered(parsed[0], str(source), desired == "run")
        self._runtime = {cid: r.company for cid, r in out.items() if r.source == "runtime"}
        return out
