"""Exit statuses of `whatsappd` that mean something to systemd and to scripts (sysexits.h).

0 clean shutdown, 1 runtime failure, 2 usage error (argparse), and these two, which the unit
lists in RestartPreventExitStatus= because restarting cannot help.
"""

from __future__ import annotations

__all__ = ["EX_CONFIG", "EX_DATAERR"]

EX_CONFIG = 78  # sysexits.h: systemd's RestartPreventExitStatus=78 avoids a restart loop
#: sysexits.h EX_DATAERR: a data file (the store) is damaged; restarting cannot help either, so
#: the unit lists it in RestartPreventExitStatus= too.
EX_DATAERR = 65
