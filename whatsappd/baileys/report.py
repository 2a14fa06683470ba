"""What an import did or why it refused: one `ImportReport` per company, as text or JSON."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from whatsappd.errors import IMPORT_REFUSALS, ErrorCode

__all__ = ["REFUSAL_CODES", "ImportReport", "Refused", "Unmapped"]

#: Why a company is refused: stable codes for scripts and for the API route, each with its HTTP
#: status and meaning in whatsappd.errors (which holds the list, so the OpenAPI document can name
#: them without loading the importer).
REFUSAL_CODES = IMPORT_REFUSALS


class Refused(Exception):
    """The company is not imported; nothing was written. `message` is one sentence for a person."""

    def __init__(self, code: ErrorCode, message: str) -> None:
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
        self.error = {"code": refusal.code.value, "message": refusal.message}
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
