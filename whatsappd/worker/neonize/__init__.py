"""The real engine: one neonize (whatsmeow) client in this worker process.

Only this package imports neonize (through lib.py, its one importer). The worker main imports
it only when the engine is neonize, after configuring logging. docs/neonize-notes.md lists the
facts about neonize 0.5.2 this code relies on; the important ones:

- ``NewClient.connect()`` blocks until the Go side is stopped. It runs here in a daemon thread;
  run() waits on an Event in the caller's thread, so signals keep working and run() can return
  even when the Go call never does.
- While the first dial is in progress (and during whatsmeow's own reconnect dials) any Go call
  that takes whatsmeow's socket lock (``stop()``, ``disconnect()``) blocks the caller for as
  long as the dial lasts, which is forever against a silent peer. So stop() never calls Go:
  run() does, from a helper thread, with a bounded wait, and only once the socket was up.
- In the QR flow, neonize delivers no event to Python until the QR loop ends; QR codes come
  through the QR callback and the loop's outcome ("success", "timeout", "err-...") through the
  login-status callback, which neonize only print()s. The engine installs its own.
- After a QR timeout, a pairing error, or a stop() during pairing, neonize's ``Neonize()`` Go
  call never returns and its thread is not a daemon: the worker must leave with ``os._exit``.

- whatsmeow's proxy is always the worker's SOCKS5 relay (relay.py), never the company's proxy
  directly: the relay holds every connect to the chat server at the connect gate (gate.py), so
  whatsmeow's own reconnects after a live drop are paced by the supervisor's global limiter
  like any worker start (neonize 0.5.2 offers no hook on them). Deciding the end closes the
  gate: a reconnect held there then fails at once.

Every handler takes the real neonize event object, so the decisions (messages and exit code)
are testable without a network: ``engine.on_logged_out(client, LoggedOutEv())``.

Never log QR codes, pairing codes, keys or message bodies at info or above: whatsmeow's own
debug log prints QR codes, so its level is held at INFO unless ``whatsmeow_debug`` is set.

Messaging (issue 4; contract in docs/INTERNALS.md, facts in docs/neonize-notes.md):

- ``send`` keeps a durable send log, ``outbox-log.jsonl`` in the session directory (sendlog.py).
- Incoming messages and receipts are turned into ``event`` messages by incoming_event() and
  receipt_event() (incoming.py), pure functions of the real neonize event objects.
- Every call into Go goes through a gate (gogate.py): messaging calls share it, and ``Stop()``
  (which removes the client from Go's unlocked map), ``Logout`` and ``PairPhone`` take it alone, so no
  messaging call ever runs on a client id Go has already forgotten.

Modules, one job each:

- ``lib.py``: loads neonize without its import side effects, with or without its Go library
  (a zygote leaves it out; its workers load it after the fork); every other module takes its
  names from there.
- ``engine.py``: NeonizeEngine, the state machine: phases, event handlers, the exit decision.
- ``client.py``: the client's life: made with the handlers wired in, dialled, stopped.
- ``pairing.py``: QR timings, the QR loop's outcomes, phone-code pairing and logout calls.
- ``incoming.py``: neonize message and receipt events -> protocol events; media raw decoding.
- ``messaging.py``: the messaging commands (send, send_status, check_number, download).
- ``media.py``: building and uploading outgoing media messages.
- ``sendlog.py``: the durable send log that makes a send happen at most once.
- ``classify.py``: whatsmeow's error texts and ConnectFailure reasons -> our codes and exits.
- ``store.py``: the whatsmeow store in the session directory (path, DSN, usable or not).
- ``gogate.py``: who may call into Go now.
"""

#: False in a zygote (worker/zygote.py), which sets it before anything imports lib.py: neonize's
#: Python side is then imported without its Go library, which each forked worker loads after
#: the fork (lib.load_library(), called by the worker main).
GO_LIBRARY_AT_IMPORT = True
