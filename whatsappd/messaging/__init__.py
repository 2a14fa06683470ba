"""What the CRM uses the connections for: the event path and the outbox.

- bus.py: the event path, supervisor events -> journal -> live readers (`EventBus`, `Subscriber`)
- sender.py: `OutboxSender`, one task per company sending its queued messages in order
- maintenance.py: expiry, unsettleable sends and journal pruning, once a second
- service.py: `Messaging`, what the control API uses of the above

daemon.py builds these and wires them; docs/INTERNALS.md tells the whole path.
"""

from whatsappd.messaging.bus import EventBus, Published, Subscriber
from whatsappd.messaging.maintenance import Maintenance
from whatsappd.messaging.sender import OutboxSender
from whatsappd.messaging.service import Messaging

__all__ = ["EventBus", "Maintenance", "Messaging", "OutboxSender", "Published", "Subscriber"]
