"""Company supervision: one runner per company, its worker process, backoff and the runtime registry.

core.Supervisor holds the runners; runner.Runner is one company's state machine and policy;
process.WorkerProcess is one worker process (launch, channel, RPC, liveness, kill).
"""

from whatsappd.supervisor.core import Supervisor
from whatsappd.supervisor.runner import Runner

__all__ = ["Runner", "Supervisor"]
