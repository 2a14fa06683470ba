"""Companies added at runtime (PUT /v1/companies/{id}), kept in STATE_DIR/companies.json.

Written atomically (temporary file, fsync, rename) with mode 0600, so a crash leaves either
the old file or the new one (and at worst a temporary file, removed at the next start). An
unreadable file is never overwritten: the daemon refuses to start and says which file and why,
so no company is silently forgotten. Its companies pass the same checks as the config file's.
"""

from __future__ import annotations

import json
import os
import re
import stat
import tempfile
from pathlib import Path
from typing import Protocol

from whatsappd.config import CompanyConfig, parse_companies
from whatsappd.logs import get_logger

__all__ = ["CompanyRegistry", "RegistryError", "RuntimeRegistry"]

_FORMAT = "whatsappd-companies"
# A write's temporary file: mkstemp's name, prefix + 8 characters of [a-z0-9_] + suffix. Only
# names of exactly this shape are ours to remove when a killed write left one behind.
_TMP_PREFIX, _TMP_SUFFIX = ".companies-", ".tmp"
_TMP_NAME = re.compile(re.escape(_TMP_PREFIX) + r"[a-z0-9_]{8}" + re.escape(_TMP_SUFFIX))

log = get_logger()


class RegistryError(Exception):
    """The registry file cannot be read; the message says which file, why and what to do."""


class CompanyRegistry(Protocol):
    """Where companies added at runtime are kept: this file, or (in a cluster) PostgreSQL (cluster/registry.py)."""

    def load(self) -> list[CompanyConfig]: ...
    def get(self, company_id: str) -> CompanyConfig | None: ...
    def put(self, company: CompanyConfig) -> None: ...
    def remove(self, company_id: str) -> None: ...


class RuntimeRegistry:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._companies: dict[str, CompanyConfig] = {}

    def load(self) -> list[CompanyConfig]:
        """Read the file (at start, before any write) and remove what killed writes left."""
        self._remove_leftovers()
        try:
            raw = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            self._companies = {}
            return []
        except (OSError, UnicodeDecodeError) as exc:
            raise RegistryError(f"cannot read {self.path}: {exc}; fix or move the file") from exc
        try:
            data = json.loads(raw)
            if not isinstance(data, dict) or data.get("format") != _FORMAT:
                raise ValueError("not a whatsappd companies file")
        except ValueError as exc:
            raise self._unusable(str(exc)) from exc
        problems: list[str] = []
        # The checks of [[companies]] in the config file: a company is valid the same way
        # wherever it comes from (ids, names without control characters, engines, proxies).
        parsed = parse_companies(data.get("companies"), problems)
        if problems:
            raise self._unusable("; ".join(problems))
        self._companies = {company.id: company for company in parsed}
        return list(parsed)

    def _unusable(self, why: str) -> RegistryError:
        return RegistryError(
            f"{self.path} is unusable ({why}); it lists the companies added with PUT /v1/companies. "
            "Fix it or move it aside, then start again"
        )

    def _remove_leftovers(self) -> None:
        """Remove the temporary files of writes killed before their rename: regular files named
        exactly as _write names them, in this file's directory; nothing else is touched."""
        try:
            entries = list(os.scandir(self.path.parent))
        except FileNotFoundError:
            return
        for entry in entries:
            if _TMP_NAME.fullmatch(entry.name) and stat.S_ISREG(entry.stat(follow_symlinks=False).st_mode):
                Path(entry.path).unlink(missing_ok=True)
                log.info("removed a temporary file left by an interrupted write", path=entry.path)

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
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=_TMP_PREFIX, suffix=_TMP_SUFFIX)
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
