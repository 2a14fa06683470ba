"""What an import did or why it refused: one `ImportReport` per company, as text or JSON."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = ["REFUSAL_CODES", "ImportReport", "Refused", "Unmapped"]

# Why a company is refused; stable, for scripts (and for the API route that will serve imports).
REFUSAL_CODES = {
    "not_found": "the source folder does not exist",
    "unreadable_source": "the source folder or one of its files cannot be read",
    "not_baileys": "the source is not a Baileys multi-file auth folder (no creds.json, a link, not a directory)",
    "not_paired": "creds.json holds no paired account (Baileys never finished pairing)",
    "malformed_source": "a file is truncated, is not the JSON Baileys writes, or holds a value of the wrong size or form",
    "key_mismatch": "a private key does not match its public key, or a signature does not verify",
    "source_busy": "a file changed less than --min-idle seconds ago: Baileys may still be running",
    "source_changed": "a file changed while the import ran: Baileys may still be running",
    "company_running": "the company's worker holds its session lock",
    "session_exists": "the company already has a whatsappd session; it is never overwritten",
    "store_check_failed": "the converted store failed SQLite's integrity or foreign key check",
    "neonize_check_failed": "neonize could not open the converted store or did not list the expected JID",
    "write_failed": "the store could not be written (disk full, permissions)",
}


class Refused(Exception):
    """The company is not imported; nothing was written. `message` is one sentence for a person."""

    def __init__(self, code: str, message: str) -> None:
        assert code in REFUSAL_CODES, code
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(frozen=True)
class Unmapped:
    """Something in the Baileys folder that has no place in the whatsmeow store, and why."""

    item: str
    reason: str


@dataclass
class ImportReport:
    company: str
    source: str
    target: str
    dry_run: bool
    ok: bool = False
    error: dict[str, str] | None = None  # {"code", "message"} when refused
    jid: str | None = None
    lid: str | None = None
    push_name: str | None = None
    platform: str | None = None
    creds_sha256: str | None = None
    baileys_layout: str | None = None  # "6" or "7"
    counts: dict[str, int] = field(default_factory=dict)
    checks: dict[str, int] = field(default_factory=dict)  # key pairs and signatures verified
    unmapped: list[Unmapped] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    neonize_jid: str | None = None  # the JID neonize listed when it opened the new store
    provenance: str | None = None

    def refuse(self, refusal: Refused) -> ImportReport:
        self.ok = False
        self.error = {"code": refusal.code, "message": refusal.message}
        return self

    def as_json(self) -> dict[str, Any]:
        return asdict(self)

    def lines(self) -> list[str]:
        """Human output: one headline, then details, indented."""
        if self.error is not None:
            return [f"refused {self.company} ({self.source}): {self.error['message']}"]
        verb = "would import" if self.dry_run else "imported"
        out = [f"{verb} {self.company}: {self.jid} from {self.source}" + ("" if self.dry_run else f" into {self.target}")]
        out.append("  " + ", ".join(f"{n} {k.replace('_', ' ')}" for k, n in self.counts.items()))
        out.append("  checked: " + ", ".join(f"{n} {k.replace('_', ' ')}" for k, n in self.checks.items()))
        if self.neonize_jid:
            out.append(f"  neonize opened the new store and lists {self.neonize_jid}")
        for u in self.unmapped:
            out.append(f"  not imported: {u.item}: {u.reason}")
        for w in self.warnings:
            out.append(f"  warning: {w}")
        if self.provenance:
            out.append(f"  provenance: {self.provenance}")
        return out
