"""Companies added at runtime (PUT /v1/companies/{id}), kept in STATE_DIR/companies.json.

Written atomically (temporary file, fsync, rename) with mode 0600, so a crash leaves either
the old file or the new one. An unreadable file is never overwritten: the daemon refuses to
start and says which file and why, so no company is silently forgotten.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from whatsappd.config import ENGINES, CompanyConfig
from whatsappd.ids import InvalidCompanyId, check_company_id

__all__ = ["RegistryError", "RuntimeRegistry"]

_FORMAT = "whatsappd-companies"


class RegistryError(Exception):
    """The registry file cannot be read; the message says which file, why and what to do."""


class RuntimeRegistry:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._companies: dict[str, CompanyConfig] = {}

    def load(self) -> list[CompanyConfig]:
        try:
            raw = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            self._companies = {}
            return []
        except (OSError, UnicodeDecodeError) as exc:
            raise RegistryError(f"cannot read {self.path}: {exc}; fix or move the file") from exc
        try:
            data = json.loads(raw)
            if data.get("format") != _FORMAT or not isinstance(data.get("companies"), list):
                raise ValueError("not a whatsappd companies file")
            companies = {}
            for item in data["companies"]:
                cid = check_company_id(item["id"])
                engine = item.get("engine", "neonize")
                if engine not in ENGINES:
                    raise ValueError(f"company {cid!r}: unknown engine {engine!r}")
                companies[cid] = CompanyConfig(id=cid, name=str(item.get("name", "")), engine=engine,
                                               proxy=item.get("proxy") or None)
        except (ValueError, KeyError, TypeError, AttributeError, InvalidCompanyId) as exc:
            raise RegistryError(
                f"{self.path} is corrupt ({exc}); it lists the companies added with PUT /v1/companies. "
                "Fix it or move it aside, then start again"
            ) from exc
        self._companies = companies
        return list(companies.values())

    def get(self, company_id: str) -> CompanyConfig | None:
        return self._companies.get(company_id)

    def put(self, company: CompanyConfig) -> None:
        companies = {**self._companies, company.id: company}
        self._write(companies)
        self._companies = companies

    def remove(self, company_id: str) -> None:
        if company_id in self._companies:
            companies = {k: v for k, v in self._companies.items() if k != company_id}
            self._write(companies)
            self._companies = companies

    def _write(self, companies: dict[str, CompanyConfig]) -> None:
        data = {"format": _FORMAT, "version": 1,
                "companies": [companies[k].to_toml() for k in sorted(companies)]}
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".companies-", suffix=".tmp")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(data, f, indent=2)
                f.write("\n")
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, 0o600)
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        dir_fd = os.open(self.path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
