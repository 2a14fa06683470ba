"""Company ids. They become directory names, so this is the only place that maps one to a path."""

from __future__ import annotations

import re
from pathlib import Path

__all__ = ["COMPANY_ID_PATTERN", "InvalidCompanyId", "check_company_id", "session_dir"]

COMPANY_ID_PATTERN = r"^[a-z0-9][a-z0-9_-]{0,63}$"
_COMPANY_ID = re.compile(r"[a-z0-9][a-z0-9_-]{0,63}")


class InvalidCompanyId(ValueError):
    """An id that does not match COMPANY_ID_PATTERN."""


def check_company_id(value: object) -> str:
    """Return value if it is a valid company id, else raise InvalidCompanyId saying why."""
    if not isinstance(value, str) or _COMPANY_ID.fullmatch(value) is None:
        raise InvalidCompanyId(
            f"{value!r} is not a valid company id: use 1 to 64 characters of a-z, 0-9, '_' and '-', "
            "starting with a letter or digit"
        )
    return value


def session_dir(sessions_root: Path, company: str) -> Path:
    """The session directory of a company: sessions_root/session-{id}; the id is validated."""
    return sessions_root / f"session-{check_company_id(company)}"
