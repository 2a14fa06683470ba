"""`[metrics] listen`: where the plain-HTTP metrics listener binds, or "" for none.

Prometheus cannot scrape a Unix socket, so the metrics may also be served on TCP. The value is
an IP literal and a port ("127.0.0.1:9464", "[::1]:9464"; "localhost" means 127.0.0.1). Host
names are refused: what a name resolves to can change under the operator, and this listener has
no authentication. A non-loopback address is honoured only because it had to be written out in
full; the daemon then logs a warning at start (see README, "Monitoring").
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

__all__ = ["ListenAddress", "parse_listen", "render_listen"]

_FORM = re.compile(r"\[(?P<v6>[^\]]*)\]:(?P<port6>[^:]*)|(?P<host>[^:\[\]]*):(?P<port>[^:]*)")
_EXAMPLE = 'expected "HOST:PORT" with an IP address, such as "127.0.0.1:9464" or "[::1]:9464", or "" for no listener'


@dataclass(frozen=True)
class ListenAddress:
    host: str  # an IP literal
    port: int

    @property
    def loopback(self) -> bool:
        return ipaddress.ip_address(self.host).is_loopback

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def parse_listen(value: object) -> ListenAddress | None:
    if value == "":
        return None
    if not isinstance(value, str):
        raise ValueError(_EXAMPLE)
    match = _FORM.fullmatch(value.strip())
    if match is None:
        raise ValueError(_EXAMPLE)
    host = match.group("v6") if match.group("v6") is not None else match.group("host")
    port_text = match.group("port6") if match.group("v6") is not None else match.group("port")
    if host == "localhost":
        host = "127.0.0.1"
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"{host!r} is not an IP address; write one (127.0.0.1 or [::1] for this machine only): "
                         "a host name could resolve to an address you did not mean") from None
    if not re.fullmatch(r"[0-9]{1,5}", port_text) or not 1 <= int(port_text) <= 65535:
        raise ValueError(f"the port must be a number from 1 to 65535 ({_EXAMPLE})")
    return ListenAddress(str(address), int(port_text))


def render_listen(value: ListenAddress | None) -> str:
    return "" if value is None else str(value)
