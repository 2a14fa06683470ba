"""A fake WhatsApp: an engine with no network, for tests and for CRM developers without a phone.

From the supervisor's side it behaves like the real neonize engine: the same messages on the
channel, the same exit codes. It is driven with the `simulate` command, args {"action": A, ...} (protocol.SIMULATE_ACTIONS):

    scan [jid] [push_name] [connect=true]  pairing -> paired, session saved, connected
    drop [reason] [down=true] / restore    connected -> reconnecting -> connected (see below)
    logged_out | replaced | outdated       run() returns LOGGED_OUT | REPLACED | OUTDATED
    ban [seconds=3600] [reason]            state banned with until, then BANNED
    fail_connect                           run() returns TRANSIENT (before run(): its connect fails)
    crash [after=0]                        os._exit(70), no reply
    hang [after=0]                         SIGSTOP to the whole process: heartbeats stop too

    incoming [from] [text="hello"] [kind] [caption] [filename] [mimetype] [size | data]
             [group] [push_name] [id]      emit a message.incoming event; {"id"}
    receipt ids [receipt="delivered"] [chat] [sender]
                                           emit message.receipt (ids: WhatsApp or outbox ids)
    stats                                  {"sent", "duplicate_requests", "by_recipient"}
    burst count [text] [from] [rate]       count incoming text events at full speed, or paced at
                                           `rate` events/s; each carries emitted_at_ns; {"emitted"}

plus the real commands `pair_phone` {"phone"} and `logout` {}, and the messaging commands of
docs/INTERNALS.md: `send`, `send_status`, `check_number`, `download`.

Life of one engine (one worker process):

    starting --run()--> connecting --(connect delay)--+-- stored device --> connected
                                                      +-- no device ------> pairing
    pairing: QR codes rotate (first 60 s, then 20 s each, 6 in all), then PAIRING_TIMEOUT;
             `simulate scan` -> paired, session saved -> connecting (the 515 reconnect)
             -> connected
    connected --drop--> reconnecting --(a reconnect attempt succeeds)--> connected
    any phase: logged_out / replaced / ban / outdated / fail_connect / stop() end run()

Connection attempts, modelled on whatsmeow: every attempt (the first, the reconnect after
pairing, each reconnect after a drop) first passes the worker's connect gate, which asks the
supervisor for a token of its global connect-rate limiter (see whatsappd/worker/gate.py), then
takes WHATSAPPD_SIM_CONNECT_DELAY. After `drop` the engine reconnects by itself, like
whatsmeow: the first attempt at once, then after 1, 2, 3... times WHATSAPPD_SIM_RECONNECT_DELAY.
With `down=true` (the default) the network is down: attempts fail until `restore`, which brings
it back and starts the next attempt at once (still through the gate). `down=false` drops only
the connection: the first reconnect attempt succeeds. The state stays `reconnecting` during
attempts, as with whatsmeow.

Choices (documented for the worker main and the supervisor):

* The store decides, not `options.pair`, exactly like whatsmeow (which pairs whenever the store
  has no device): with `pair=False` and no stored device the simulator starts pairing rather
  than returning LOGGED_OUT; with `pair=True` and a stored device it restores the session.
* Terminal outcomes are told by the exit code only. The single exception is a ban: a
  `state` message `banned` with `until` precedes ExitCode.BANNED (the expiry is not in the code).
* Logging out (the phone unlinks, or the `logout` command) clears the device from the store
  but leaves the file in place, as whatsmeow deletes its device rows: the supervisor removes
  the session files; if it does not, the next start pairs anew instead of "restoring".
* A store that cannot be parsed makes run() return ExitCode.STORE_UNUSABLE.
* Environment variables (read when the engine is created) tune the timings; a bad value makes
  run() return ExitCode.BAD_INVOCATION:
    WHATSAPPD_SIM_QR_FIRST       seconds the first QR code is valid (60)
    WHATSAPPD_SIM_QR_NEXT        seconds every later code is valid (20)
    WHATSAPPD_SIM_QR_COUNT       codes before the pairing times out (6)
    WHATSAPPD_SIM_CONNECT_DELAY  seconds "connecting" takes (0.05); "inf" never connects,
                                 like a proxy that accepts and stays silent (stop() still works)
    WHATSAPPD_SIM_RECONNECT_DELAY  seconds added to the wait after each failed reconnect
                                 attempt (2, whatsmeow's)
    WHATSAPPD_SIM_FAIL_CONNECT_FILE  a path ("{company}" is replaced by the company id): while
                                 that file exists every connect attempt fails (TRANSIENT). It is
                                 checked at each attempt, so a test can let a company fail a few
                                 times, remove the file, and watch it connect.
    WHATSAPPD_SIM_SEND_DELAY     seconds each `send` takes (0); a drop or stop during it makes
                                 the send fail with not_connected, nothing sent
    WHATSAPPD_SIM_SEND_FAIL_FILE a path ("{company}" replaced): while it exists every `send`
                                 fails with send_failed (transient), nothing sent
    WHATSAPPD_SIM_AUTO_RECEIPTS  e.g. "delivered,read": after each successful send, these
                                 message.receipt events follow, always in the order delivered,
                                 read, played, each RECEIPT_DELAY after the one before
    WHATSAPPD_SIM_RECEIPT_DELAY  seconds between automatic receipts (0.05)
    WHATSAPPD_SIM_RECEIPTS_FIRST  "1": the automatic receipts go out before the send's reply
                                 (a receipt overtaking its send, which a real network can do)

Messaging (issue 4):

* The send log is the simulator's "server". Sending is one append + fsync of a JSON line
  {"outbox_id", "wa_id", "to", "kind", "text", "caption", "filename", "mimetype", "size",
  "timestamp"} to SEND_LOG_FILE (0600) in the session directory: once the line is there, the
  message was sent; if it is not, it was not. So `send_status` never answers "attempted".
  A `send` for an outbox id already in the log sends nothing and returns the first wa_id and
  timestamp; the request is noted in DUPLICATES_FILE, so `stats` (and send_log_stats() with
  no worker running) show duplicates across worker restarts. A torn last line (a crash in the
  middle of an append) is cut off when the engine starts; any other corrupt line makes run()
  return STORE_UNUSABLE, like a corrupt store.
* Phone numbers whose digits end in 0000 are not on WhatsApp (send: not_on_whatsapp,
  check_number: on_whatsapp false). Every well-formed group JID exists.
* `send` checks, in order: its arguments (permanent invalid_argument / invalid_recipient /
  too_large), the connection (not_connected), the send delay, the send-fail file (send_failed),
  duplicates, the recipient (not_on_whatsapp), the media file (permanent media_invalid /
  too_large, see worker/media.py); then it sends.
* Incoming media: the event's `raw` is base64 of a small JSON document ({"sim_media": 1, ...})
  that `download` understands: the bytes inline (up to MAX_INLINE_MEDIA), a file in
  MEDIA_DIR in the session directory (bigger `data`), or a seed from which reproducible bytes
  of the given `size` are made up. Anything else is media_unavailable (permanent).
* Text events carry no `raw` key; media events always do.
* Receipts (automatic or `simulate receipt`) are emitted only while connected; an automatic
  one that falls due while the connection is down is lost.

A shared server (issue 13): with `[simulator] server_dir` (EngineOptions.server_dir, the worker's
`--sim-server-dir`), everything this docstring places "in the session directory" (the device,
send log, duplicates, presence log, media) is in server_dir/<company>/ instead, shared by every
daemon of the machine, plus a connection log: a connection replaces the company's older live one,
which ends REPLACED (see connections.py). The session directory then holds only the worker's lock.

Modules, one job each:

* ``engine.py``: SimulatorEngine, the state machine (phases, timers, connection attempts through
  the gate) and the commands and simulate actions it carries out.
* ``actions.py``: the simulate actions' arguments and the events they make (incoming, receipts,
  bursts).
* ``server.py``: the fake WhatsApp's memory: the session file (the paired device), the send log,
  the incoming media "CDN".
* ``config.py``: timings and fault injection from WHATSAPPD_SIM_* variables.
* ``connections.py``: the shared server's connection log (connect, replace, disconnect).
"""
