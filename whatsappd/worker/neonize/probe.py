"""`python -m whatsappd.worker.neonize.probe`: which whatsmeow device a worker's client loads.

For tests and benchmarks only (whatsappd/testing/whatsmeow_pg.py starts it; the supervisor side
never imports the worker side). A request as JSON on stdin (the DSN never goes on argv): make a
neonize client exactly as a worker does (`StorePlace.client`), or as whatsappd did before devices
were selected (`unselected`: no JID, so neonize loads the database's first device), let it dial
the given (refusing) SOCKS5 listener on 127.0.0.1, and print `LOADED {"jid": ...}`.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

__all__: list[str] = []

_MARK = "LOADED "


def _main(request: dict[str, Any]) -> None:
    import logging

    logging.disable(logging.CRITICAL)
    from whatsappd.worker.neonize import lib

    lib.load_library()
    from whatsappd.worker.neonize.incoming import jid_string
    from whatsappd.worker.neonize.lib import NewClient, ProxySettings
    from whatsappd.worker.neonize.store import StorePlace

    if request["unselected"]:
        client = NewClient(request["dsn"], uuid=request["company"])
    else:
        place = StorePlace(session_dir=Path("."), dsn=request["dsn"], jid=request["jid"], pair=request["pair"])
        client = place.client(request["company"])
    try:
        client.connect(ProxySettings(proxy_address=request["proxy"]))
    except Exception:  # noqa: BLE001 - the refused dial
        pass
    me = client.get_me()
    print(_MARK + json.dumps({"jid": jid_string(me.JID) if me.HasField("JID") else None}), flush=True)


if __name__ == "__main__":
    _main(json.loads(sys.stdin.read()))
    sys.stdout.flush()
    os._exit(0)  # the Go runtime's threads must not keep the process alive
