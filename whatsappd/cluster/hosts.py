"""The API on every host of a PostgreSQL store: events, company status and acts across hosts.

`CrossHost` is what a daemon on the PostgreSQL backend adds so that any host answers for any
company (issue 13):

- the journal tail and the LISTEN connection (cluster/tail.py): every host's events reach this
  host's live streams (and webhooks), with their secrets;
- `whatsappd_outbox` notifications wake this host's sender for a message queued elsewhere;
- the owner upserts each of its companies' snapshot into `whatsappd_company_status` on every
  change (fenced with its lease token in cluster mode); `owners()` tells the others who owns
  what, and in what state;
- an act asked on a host that does not own the company becomes a `whatsappd_commands` row for
  its owner (`route`), which runs it with the routes' own code (`serve`) and answers in a NOTIFY;
  the asker waits within ROUTE_TIMEOUT.

Who owns a company: with [cluster], the lease holder (`Supervisor.owned(cid)`: the token held
here); several daemons on one database without [cluster] each own the companies they run, and
the others learn it from the owner's status row.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import psycopg
from psycopg.rows import DictRow, dict_row

from whatsappd.cluster.leases import TOKEN_HELD_SQL
from whatsappd.cluster.shared import COMMANDS_CHANNEL, MAX_PAYLOAD
from whatsappd.cluster.tail import JournalTail, Listener
from whatsappd.errors import ErrorCode, Failure
from whatsappd.logs import get_logger
from whatsappd.store import Event, Secret
from whatsappd.store.postgresql import PostgresStore, redact
from whatsappd.timefmt import iso_or_none

if TYPE_CHECKING:
    from whatsappd.config import Config
    from whatsappd.supervisor import Runner, Supervisor

__all__ = ["ROUTE_TIMEOUT", "Answer", "CrossHost", "Execute", "Owner"]

log = get_logger()

#: How long a host waits for the owner's answer to a routed act (an owner's connect waits up
#: to 10 s for the worker's first word itself).
ROUTE_TIMEOUT = 15.0
#: Every company's status row is written again this often, besides on each change.
STATUS_REFRESH = 30.0

#: (HTTP status, JSON body) of an act, as the routes answer it.
Answer = tuple[int, dict[str, Any]]
#: Runs an act on a company owned here: (act, company, args) -> its answer.
Execute = Callable[[str, str, dict[str, Any]], Awaitable[Answer]]


@dataclass(frozen=True)
class Owner:
    """Who owns a company, and its status as that owner last wrote it."""

    host: str | None  # None: nobody owns it now (no live lease)
    token: int | None
    lease_expires_at: str | None  # ISO time; None without leases
    snapshot: dict[str, Any] | None  # the owner's GET /v1/companies/{id} (without sending, owner)
    reported: dict[str, Any] | None = None  # who wrote that snapshot, and when: {"host", "at"}

    def field(self) -> dict[str, Any] | None:
        """The `owner` field of a company's answer."""
        if self.host is None:
            return None
        return {"host": self.host, "token": self.token, "lease_expires_at": self.lease_expires_at}


class CrossHost:
    """A host's share of the API on every host (see the module's docstring)."""

    def __init__(self, config: Config, store: PostgresStore, supervisor: Supervisor,
                 deliver: Callable[[Event, Secret], None], wake_sender: Callable[[str], None],
                 snapshot: Callable[[Runner], dict[str, Any]]) -> None:
        """deliver: the bus's (and webhooks') commit listener; snapshot: a company's GET answer."""
        self.dsn = config.store_dsn
        self.sup = supervisor
        self.host = supervisor.host_id
        self.cluster = supervisor.cluster  # leases say who owns what; else the host running a company owns it
        self.tail = JournalTail(store, deliver)
        self.listener = Listener(self.dsn, self.host, self.tail, self._outbox_note, self._commands_note,
                                 self._listening)
        self._wake_sender = wake_sender
        self._snapshot = snapshot
        self._execute: Execute | None = None
        self._db: psycopg.AsyncConnection[DictRow] | None = None
        self._db_lock = asyncio.Lock()
        self._answers: dict[int, asyncio.Future[Answer]] = {}
        self._dirty: set[str] = set()
        self._known: set[str] = set()  # the supervisor's companies when last looked at
        self._status_wake = asyncio.Event()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._status_task: asyncio.Task[None] | None = None
        #: [cluster] Set while this host delivers the webhooks (one host does: see _elect); None:
        #: every daemon delivers its own, as on a single host.
        self.webhook_turn: asyncio.Event | None = asyncio.Event() if self.cluster else None
        self._period = config.cluster_renew_interval

    # ------------------------------------------------------------------------ start, stop

    def start(self, execute: Execute) -> None:
        """Once the store is open and the supervisor started: tail, listen, publish status, serve acts."""
        self._execute = execute
        self.sup.listeners.append(self._supervisor_event)
        self.tail.start()
        self.listener.start()
        self.companies_changed()
        self._status_task = asyncio.get_running_loop().create_task(self._publish_status(), name="company status")
        if self.webhook_turn is not None:
            self._spawn(self._elect(self.webhook_turn), "webhook delivery election")

    async def close(self) -> None:
        tasks = [t for t in (self._status_task, *self._tasks) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await asyncio.gather(self.listener.close(), self.tail.close())
        if self._db is not None:
            await self._db.close()

    def _spawn(self, work: Awaitable[Any], name: str) -> None:
        async def run() -> None:
            await work

        task = asyncio.get_running_loop().create_task(run(), name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _sql(self, fn: Callable[[psycopg.AsyncConnection[DictRow]], Awaitable[Any]]) -> Any:
        """fn(connection) on this host's own connection for cross-host rows (made again if lost)."""
        async with self._db_lock:
            if self._db is None or self._db.closed or self._db.broken:
                try:
                    self._db = await psycopg.AsyncConnection.connect(self.dsn, autocommit=True, row_factory=dict_row,
                                                                     connect_timeout=10)
                except psycopg.Error as exc:
                    raise Failure(ErrorCode.OWNER_UNREACHABLE, f"cannot reach the PostgreSQL store "
                                  f"{redact(self.dsn)}: {str(exc).replace(self.dsn, redact(self.dsn))}") from None
            return await fn(self._db)

    # ------------------------------------------------------------------------- who owns what

    def owned(self, company: str) -> int | None:
        """The lease token held here for company (0 without leases), None if another host owns it."""
        return self.sup.owned(company)

    async def owners(self, companies: list[str] | None = None) -> dict[str, Owner]:
        """Every company some host owns or wrote the status of (or those named), by id."""
        async def query(db: psycopg.AsyncConnection[DictRow]) -> list[DictRow]:
            where = "" if companies is None else "WHERE company = ANY(%(companies)s)"
            cur = await db.execute(
                "SELECT company, s.host, s.token, s.snapshot, extract(epoch FROM s.updated_at)::float8 AS reported_at, "
                "l.owner, l.token AS lease_token, l.expires_at > now() AS live, "
                # epoch seconds: a never-held lease expires at -infinity, which no Python datetime holds
                "extract(epoch FROM l.expires_at)::float8 AS expires "
                f"FROM (SELECT company FROM whatsappd_company_status {where} UNION "
                f"SELECT company FROM whatsappd_company_leases {where}) c "
                "LEFT JOIN whatsappd_company_status s USING (company) "
                "LEFT JOIN whatsappd_company_leases l USING (company)", {"companies": companies})
            return await cur.fetchall()

        out = {}
        for row in await self._sql(query):
            reported = (None if row["host"] is None else
                        {"host": row["host"], "at": iso_or_none(row["reported_at"])})
            if self.cluster:  # the lease says who owns it; its status counts only if written under that lease
                live = bool(row["live"]) and row["owner"] is not None
                snapshot = row["snapshot"] if not live or row["token"] == row["lease_token"] else None
                out[row["company"]] = Owner(row["owner"] if live else None, row["lease_token"] if live else None,
                                            iso_or_none(row["expires"]) if live else None, snapshot,
                                            reported if snapshot is not None else None)
            elif row["host"] is not None:
                out[row["company"]] = Owner(row["host"], row["token"], None, row["snapshot"], reported)
        return out

    async def owner(self, company: str) -> Owner | None:
        """company's owner (None: no host knows the company)."""
        return (await self.owners([company])).get(company)

    # ---------------------------------------------------------------------- company status

    def _supervisor_event(self, event: dict[str, Any], secret: dict[str, Any] | None) -> None:
        company = event.get("company")
        if isinstance(company, str) and str(event.get("type", "")).startswith("company."):
            self._dirty.add(company)
            self._status_wake.set()

    def companies_changed(self) -> None:
        """The supervisor's companies may have changed (one added or removed, without an event)."""
        now = set(self.sup.companies)
        changed = now ^ self._known
        self._known = now
        if changed:
            self._dirty |= changed
            self._status_wake.set()

    async def _publish_status(self) -> None:
        owned: set[str] = set()
        refreshed = time.monotonic()
        while True:
            try:
                await asyncio.wait_for(self._status_wake.wait(), self._period)
            except TimeoutError:
                pass
            self._status_wake.clear()
            # A company acquired here (a lease) need not change state, so no event says so: look.
            now = {company for company in self.sup.companies if self.owned(company) is not None}
            self._dirty |= now - owned
            owned = now
            if time.monotonic() - refreshed >= STATUS_REFRESH:
                self._dirty |= now
                refreshed = time.monotonic()
            dirty, self._dirty = self._dirty, set()
            try:
                await self._write_status(sorted(dirty))
            except (psycopg.Error, Failure) as exc:
                log.warning("cannot write company status for the other hosts; retrying", error=str(exc))
                self._dirty |= dirty
                await asyncio.sleep(1.0)
                self._status_wake.set()

    async def _write_status(self, companies: list[str]) -> None:
        rows, gone = [], []
        for company in companies:
            runner = self.sup.companies.get(company)
            token = self.owned(company)
            if runner is None:
                gone.append(company)
            elif token is not None:
                rows.append({"company": company, "host": self.host, "token": token if self.cluster else None,
                             "snapshot": json.dumps(self._snapshot(runner), separators=(",", ":"))})
        fence = f"WHERE {TOKEN_HELD_SQL}" if self.cluster else ""

        async def write(db: psycopg.AsyncConnection[DictRow]) -> None:
            async with db.transaction(), db.cursor() as cur:
                if rows:
                    # Fenced in cluster mode: a host that lost the lease writes nothing.
                    await cur.executemany(
                        "INSERT INTO whatsappd_company_status (company, host, token, snapshot, updated_at) "
                        f"SELECT %(company)s, %(host)s, %(token)s, %(snapshot)s::json, now() {fence} "
                        "ON CONFLICT (company) DO UPDATE SET host = EXCLUDED.host, token = EXCLUDED.token, "
                        "snapshot = EXCLUDED.snapshot, updated_at = EXCLUDED.updated_at", rows)
                if gone:
                    await cur.execute("DELETE FROM whatsappd_company_status WHERE company = ANY(%s) AND host = %s",
                                      (gone, self.host))

        if rows or gone:
            await self._sql(write)

    # ------------------------------------------------------------------ acts on other hosts

    async def route(self, company: str, act: str, args: dict[str, Any]) -> Answer:
        """Have company's owner run act(args); its answer. 404 if no host knows the company, 503
        no_owner if none owns it now, 504 owner_unreachable if its owner did not answer in time."""
        owner = await self.owner(company)
        if owner is None:
            raise Failure(ErrorCode.COMPANY_NOT_FOUND, f"no company {company!r} on any host")
        if owner.host is None or owner.host == self.host:
            raise Failure(ErrorCode.NO_OWNER, f"no host owns company {company!r} now (its lease expired or was "
                          "released); another host takes it over within a lease period: try again")
        try:  # the answer comes as a notification: listen first
            await asyncio.wait_for(self.listener.connected.wait(), ROUTE_TIMEOUT / 2)
        except TimeoutError:
            raise Failure(ErrorCode.OWNER_UNREACHABLE, "this host cannot listen to the database now; "
                          "try again, or ask the owner's host directly") from None
        host = owner.host

        async def insert(db: psycopg.AsyncConnection[DictRow]) -> int:
            async with db.transaction():
                cur = await db.execute("INSERT INTO whatsappd_commands (company, host, asker, act, args) "
                                       "VALUES (%s, %s, %s, %s, %s) RETURNING id",
                                       (company, host, self.host, act, json.dumps(args)))
                row = await cur.fetchone()
                assert row is not None
                await db.execute("SELECT pg_notify(%s, %s)", (COMMANDS_CHANNEL, json.dumps({"host": host})))
                return int(row["id"])

        command = await self._sql(insert)
        future = self._answers[command] = asyncio.get_running_loop().create_future()
        try:
            return await asyncio.wait_for(asyncio.shield(future), ROUTE_TIMEOUT)
        except TimeoutError:
            pass
        finally:
            self._answers.pop(command, None)

        async def withdraw(db: psycopg.AsyncConnection[DictRow]) -> bool:
            cur = await db.execute("DELETE FROM whatsappd_commands WHERE id = %s RETURNING claimed_at", (command,))
            row = await cur.fetchone()
            return row is not None and row["claimed_at"] is not None

        taken = await self._sql(withdraw)
        raise Failure(ErrorCode.OWNER_UNREACHABLE, f"host {host!r} owns company {company!r} but did not answer "
                      f"within {ROUTE_TIMEOUT:g}s; " + ("it took the request, which may still happen" if taken else
                                                       "it never took the request (withdrawn; nothing happened)"),
                      owner=host)

    def _commands_note(self, note: dict[str, Any]) -> None:
        if note.get("host") == self.host:
            self._spawn(self._take_commands(), "commands")
        elif "id" in note:
            future = self._answers.get(int(note["id"]))
            if future is not None and not future.done():
                future.set_result((int(note["status"]), dict(note["body"])))

    def _listening(self) -> None:
        """The LISTEN connection is (again) in place: commands sent meanwhile are waiting."""
        self._spawn(self._take_commands(), "commands")

    async def _take_commands(self) -> None:
        async def claim(db: psycopg.AsyncConnection[DictRow]) -> list[DictRow]:
            # A command older than the asker's wait was withdrawn or is moot: it never runs late.
            await db.execute("DELETE FROM whatsappd_commands WHERE host = %s AND created_at < now() - %s * "
                             "interval '1 second'", (self.host, ROUTE_TIMEOUT * 2))
            cur = await db.execute("UPDATE whatsappd_commands SET claimed_at = now() WHERE host = %s AND "
                                   "claimed_at IS NULL AND created_at > now() - %s * interval '1 second' "
                                   "RETURNING id, company, act, args", (self.host, ROUTE_TIMEOUT))
            return await cur.fetchall()

        try:
            commands = await self._sql(claim)
        except (psycopg.Error, Failure) as exc:
            log.warning("cannot take the acts asked by other hosts", error=str(exc))
            return
        for row in commands:
            self._spawn(self._run_command(row), f"command {row['id']}")

    async def _run_command(self, row: DictRow) -> None:
        assert self._execute is not None
        company, act = row["company"], row["act"]
        try:
            if self.owned(company) is None:
                raise Failure(ErrorCode.NO_OWNER, f"host {self.host!r} no longer owns company {company!r}; "
                              "try again once its new owner took it")
            status, body = await self._execute(act, company, dict(row["args"]))
        except Failure as exc:
            if exc.code is ErrorCode.NOT_OWNER:  # the lease went while the act ran: the asker may retry
                exc = Failure(ErrorCode.NO_OWNER, f"host {self.host!r} lost company {company!r} while running "
                              f"{act}; try again once its new owner took it")
            status, body = exc.status, exc.body()
        except Exception:
            log.exception("a routed act failed", act=act, company=company)
            status, body = 500, Failure(ErrorCode.INTERNAL_ERROR, f"the owner {self.host!r} failed to run {act}; "
                                        "see its log").body()
        log.info("ran an act asked on another host", act=act, company=company, status=status)
        payload = json.dumps({"id": row["id"], "status": status, "body": body}, separators=(",", ":"))
        if len(payload.encode()) > MAX_PAYLOAD:
            error = Failure(ErrorCode.INTERNAL_ERROR, f"the owner's answer to {act} is too large to pass on; "
                            f"ask host {self.host!r} directly").body()
            payload = json.dumps({"id": row["id"], "status": 500, "body": error})

        async def answer(db: psycopg.AsyncConnection[DictRow]) -> None:
            async with db.transaction():  # the row goes with the answer: nothing of it stays stored
                await db.execute("DELETE FROM whatsappd_commands WHERE id = %s", (row["id"],))
                await db.execute("SELECT pg_notify(%s, %s)", (COMMANDS_CHANNEL, payload))

        try:
            await self._sql(answer)
        except (psycopg.Error, Failure) as exc:
            log.warning("cannot answer an act asked by another host", act=act, company=company, error=str(exc))

    # --------------------------------------------------------------------------- webhooks

    async def _elect(self, turn: asyncio.Event) -> None:
        """One host delivers the webhooks (each host would otherwise POST every event): the live
        host with the smallest id, decided again each renew period. A host that cannot tell
        stops delivering; a change of hands may send an event twice, never lose one."""
        while True:
            async def smallest(db: psycopg.AsyncConnection[DictRow]) -> str | None:
                cur = await db.execute("SELECT min(host) AS host FROM whatsappd_cluster_hosts WHERE expires_at > now()")
                row = await cur.fetchone()
                return None if row is None else row["host"]

            try:
                mine = await self._sql(smallest) == self.host
            except (psycopg.Error, Failure) as exc:
                log.warning("cannot tell which host delivers the webhooks; not delivering here", error=str(exc))
                mine = False
            if mine != turn.is_set():
                log.info("webhook delivery " + ("taken over by this host" if mine else "left to another host"))
                if mine:
                    turn.set()
                else:
                    turn.clear()
            await asyncio.sleep(self._period)

    # ----------------------------------------------------------------------------- outbox

    def _outbox_note(self, company: str) -> None:
        if self.owned(company) is not None:
            self._wake_sender(company)
