"""The simulator's timings and fault injection, from WHATSAPPD_SIM_* environment variables
(the package docstring lists them)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

from whatsappd.protocol import RECEIPTS

__all__ = ["SimulatorConfig"]


@dataclass(frozen=True)
class SimulatorConfig:
    """Timings and fault injection, from WHATSAPPD_SIM_* environment variables."""

    qr_first: float = 60.0
    qr_next: float = 20.0
    qr_count: int = 6
    connect_delay: float = 0.05
    reconnect_delay: float = 2.0
    fail_connect_file: str | None = None
    send_delay: float = 0.0
    send_fail_file: str | None = None
    auto_receipts: tuple[str, ...] = ()
    receipt_delay: float = 0.05
    receipts_first: bool = False

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> SimulatorConfig:
        """Parse the environment; raise ValueError naming the bad variable."""
        default = cls()
        fail_file = env.get("WHATSAPPD_SIM_FAIL_CONNECT_FILE") or None
        return cls(
            qr_first=_env_seconds(env, "WHATSAPPD_SIM_QR_FIRST", default.qr_first, allow_inf=False),
            qr_next=_env_seconds(env, "WHATSAPPD_SIM_QR_NEXT", default.qr_next, allow_inf=False),
            qr_count=_env_count(env, "WHATSAPPD_SIM_QR_COUNT", default.qr_count),
            connect_delay=_env_seconds(
                env, "WHATSAPPD_SIM_CONNECT_DELAY", default.connect_delay, allow_inf=True
            ),
            reconnect_delay=_env_seconds(
                env, "WHATSAPPD_SIM_RECONNECT_DELAY", default.reconnect_delay, allow_inf=False
            ),
            fail_connect_file=fail_file,
            send_delay=_env_seconds(env, "WHATSAPPD_SIM_SEND_DELAY", default.send_delay, allow_inf=False),
            send_fail_file=env.get("WHATSAPPD_SIM_SEND_FAIL_FILE") or None,
            auto_receipts=_env_receipts(env, "WHATSAPPD_SIM_AUTO_RECEIPTS"),
            receipt_delay=_env_seconds(
                env, "WHATSAPPD_SIM_RECEIPT_DELAY", default.receipt_delay, allow_inf=False
            ),
            receipts_first=env.get("WHATSAPPD_SIM_RECEIPTS_FIRST", "") == "1",
        )

    @property
    def pairing_window(self) -> float:
        """Seconds from the first QR code to the pairing timeout (160 with the defaults)."""
        return self.qr_first + self.qr_next * (self.qr_count - 1)


def _env_seconds(env: Mapping[str, str], name: str, default: float, *, allow_inf: bool) -> float:
    raw = env.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"{name}={raw!r} is not a number of seconds") from None
    if math.isnan(value) or value < 0 or (math.isinf(value) and not allow_inf):
        raise ValueError(f"{name}={raw!r} must be a finite number of seconds >= 0")
    return value


def _env_count(env: Mapping[str, str], name: str, default: int) -> int:
    raw = env.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"{name}={raw!r} is not a whole number") from None
    if value < 1:
        raise ValueError(f"{name}={raw!r} must be at least 1")
    return value


def _env_receipts(env: Mapping[str, str], name: str) -> tuple[str, ...]:
    """A comma-separated subset of RECEIPTS, returned in RECEIPTS order (delivered first)."""
    raw = env.get(name)
    if raw is None or raw.strip() == "":
        return ()
    wanted = {part.strip() for part in raw.split(",") if part.strip()}
    unknown = wanted - set(RECEIPTS)
    if unknown:
        raise ValueError(f"{name}={raw!r}: unknown receipt {min(unknown)!r}; known: {', '.join(RECEIPTS)}")
    return tuple(r for r in RECEIPTS if r in wanted)

