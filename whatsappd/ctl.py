"""`whatsappctl`: the sysadmin's client for the control socket.

Human output by default, `--json` for scripts. Exit codes: 0 success, 1 the daemon answered
with an error, 2 usage error, 3 the daemon cannot be reached.

Everything the daemon answers is data, never terminal commands: human output is built from a
copy of the answer with every control and format character escaped (whatsappd.terminal), and
the QR code is drawn here from its payload.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from whatsappd import __version__
from whatsappd.client import Client, DaemonUnavailable, Response, StreamRefused
from whatsappd.config import ConfigError, default_paths, load_config
from whatsappd.states import RESTING
from whatsappd.terminal import escape, escape_all

__all__ = ["main"]

EXIT_ERROR, EXIT_USAGE, EXIT_UNAVAILABLE = 1, 2, 3


class CommandFailed(Exception):
    """A command that did not do what was asked: its message for stderr, the process's exit status,
    and the daemon's JSON answer (printed with --json) when there was one."""

    def __init__(self, message: str, exit_status: int = EXIT_ERROR, body: Any = None,
                 to_stdout: bool = False) -> None:
        super().__init__(message)
        self.exit_status = exit_status
        self.body = body
        self.to_stdout = to_stdout  # a result that only makes the exit status non-zero (doctor's findings)


def system_socket() -> Path:
    """The system service's socket: control.socket_path in /etc/whatsappd/whatsappd.toml, read as
    the service reads it, or its default /run/whatsappd/control.sock (also when this user may
    not read the file)."""
    try:
        return load_config(env={}, uid=0).control_socket_path
    except (ConfigError, OSError):
        return default_paths(env={}, uid=0)[1]


def _exists(path: Path) -> bool | None:
    """Whether something is at path; None when a directory on the way may not be searched."""
    try:
        path.lstat()
    except (FileNotFoundError, NotADirectoryError):
        return False
    except OSError:
        return None
    return True


def default_socket(env: dict[str, str] | None = None) -> str:
    """--socket's default, the first of: $WHATSAPPD_SOCKET; your own daemon's socket (where a
    `whatsappd run` started by you without a config puts it) if it exists; the system service's.

    A member of the socket's group is not root, but it is the system daemon they mean; the
    per-user socket comes first only because it exists only if they started one themselves.
    Raises CommandFailed when neither socket is there, naming both.
    """
    env = dict(os.environ) if env is None else env
    if env.get("WHATSAPPD_SOCKET"):
        return env["WHATSAPPD_SOCKET"]
    own, system = default_paths(env)[1], system_socket()
    if own != system and _exists(own):
        return str(own)
    if own != system and _exists(system) is False:
        raise CommandFailed(
            f"the daemon is not running: no socket at {system} (the system service) nor at {own} (a "
            "whatsappd run started by you). Start it (systemctl start whatsappd, or whatsappd run) or "
            "point --socket at its socket", EXIT_UNAVAILABLE)
    return str(system)


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    parts = []
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            parts.append(f"{seconds // size}{unit}")
            seconds %= size
    parts.append(f"{seconds}s")
    return "".join(parts[:2])


def _check(resp: Response) -> tuple[Any, Any]:
    """(the answer as sent, for --json; a copy with its strings escaped, for human output), or
    CommandFailed carrying the daemon's error sentence (escaped too)."""
    try:
        body = resp.json()
    except ValueError:
        raise CommandFailed(f"HTTP {resp.status}: {escape(resp.body[:200].decode(errors='replace'))}") from None
    shown = escape_all(body)
    if not resp.ok:
        error = shown.get("error", {}) if isinstance(shown, dict) else {}
        message = error.get("message", f"HTTP {resp.status}")
        problems = error.get("problems") or []
        detail = "".join(f"\n  - {p}" for p in problems)
        raise CommandFailed(f"{message} [{error.get('code', resp.status)}]{detail}", body=body)
    return body, shown


def cmd_health(client: Client, args: argparse.Namespace) -> tuple[Any, str]:
    raw, body = _check(client.get("/v1/health"))
    by_state = body["companies"]["by_state"]
    states = ", ".join(f"{n} {s}" for s, n in sorted(by_state.items())) or "none"
    text = (f"whatsappd {body['version']}: {body['status']}, up {_duration(body['uptime_seconds'])}, "
            f"pid {body['pid']}\n"
            f"socket:    {body['socket']}\n"
            f"config:    {body['config']['source']}\n"
            f"companies: {body['companies']['total']} ({states})")
    storage = body.get("storage") or {}
    if storage.get("state", "ok") != "ok":
        text += f"\nstorage:   {storage['state'].upper()} since {storage.get('since')}: {storage.get('message')}"
    for cid, sending in (body.get("sending_paused") or {}).items():
        text += f"\nsending:   {cid} PAUSED until {sending.get('until')}: {sending.get('reason')}"
    last = body["config"].get("last_reload")
    if last and not last.get("ok"):
        text += f"\nlast reload FAILED at {last['at']}: " + "; ".join(last.get("problems", []))
    return raw, text


def cmd_list(client: Client, args: argparse.Namespace) -> tuple[Any, str]:
    raw, body = _check(client.get("/v1/companies"))
    rows = [("ID", "STATE", "SINCE", "NAME")]
    for c in body["companies"]:
        rows.append((c["id"], c["state"], c["since"], c.get("name", "")))
    if len(rows) == 1:
        return raw, "no companies (add [[companies]] to the config, or PUT /v1/companies/ID)"
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    lines = ["  ".join(r[i].ljust(widths[i]) for i in range(3)) + "  " + r[3] for r in rows]
    return raw, "\n".join(line.rstrip() for line in lines)


def cmd_reload(client: Client, args: argparse.Namespace) -> tuple[Any, str]:
    raw, body = _check(client.post("/v1/reload"))
    parts = [f"{key} {', '.join(body[key])}" for key in ("added", "removed", "changed") if body[key]]
    if body["settings"]:
        parts.append(f"settings {', '.join(body['settings'])}")
    hooks = body.get("webhooks") or {}
    parts += [f"webhooks {key} {', '.join(hooks[key])}" for key in ("added", "removed", "changed") if hooks.get(key)]
    text = f"configuration reloaded from {body['source']}: " + ("; ".join(parts) if parts else "no changes")
    if body["restart_required"]:
        text += f"\nnote: {', '.join(body['restart_required'])} apply only after a restart"
    return raw, text


def _ago(iso: str | None) -> str:
    if not iso:
        return ""
    from datetime import datetime

    try:
        seconds = time.time() - datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return iso
    return f"{iso} ({_duration(max(0.0, seconds))} ago)"


def _company_text(c: dict[str, Any]) -> str:
    title = c["id"] + (f" ({c['name']})" if c.get("name") else "")
    lines = [f"{title}: {c['state']} since {_ago(c.get('since'))}"]
    if c.get("reason"):
        lines.append(f"  reason:     {c['reason']}")
    if c.get("jid"):
        lines.append(f"  jid:        {c['jid']}" + (f"  ({c['push_name']})" if c.get("push_name") else ""))
    lines.append(f"  engine:     {c.get('engine')}  (from {c.get('source')}); session stored: "
                 f"{'yes' if c.get('has_session') else 'no'}")
    error = c.get("last_error")
    if error:
        lines.append(f"  last error: {error['message']} [{error['code']}] at {error.get('at')}")
    reconnect = c.get("reconnect") or {}
    if reconnect.get("next_retry_at"):
        lines.append(f"  reconnect:  attempt {reconnect['attempt']}, next retry at {reconnect['next_retry_at']}")
    if c.get("banned_until"):
        lines.append(f"  banned until {c['banned_until']}")
    sending = c.get("sending") or {}
    if sending.get("state") in ("paced", "paused"):
        lines.append(f"  sending:    {sending['state']} until {sending.get('until')} ({sending.get('reason')})")
    worker = c.get("worker") or {}
    lines.append(f"  worker:     {'pid ' + str(worker['pid']) if worker.get('pid') else 'not running'}, "
                 f"{worker.get('restarts', 0)} restarts")
    if c.get("qr_available"):
        lines.append(f"  a QR code is waiting: whatsappctl qr {c['id']}")
    return "\n".join(lines)


def cmd_status(client: Client, args: argparse.Namespace) -> tuple[Any, str]:
    raw, body = _check(client.get(f"/v1/companies/{args.id}"))
    return raw, _company_text(body)


def cmd_qr(client: Client, args: argparse.Namespace) -> tuple[Any, str]:
    if args.png:
        resp = client.get(f"/v1/companies/{args.id}/qr?format=png")
        if not resp.ok:
            _check(resp)
        Path(args.png).write_bytes(resp.body)
        return {"png": args.png}, f"QR code written to {args.png}"
    raw, body = _check(client.get(f"/v1/companies/{args.id}/qr"))
    if args.json:
        return raw, ""
    return raw, _qr_text(raw["code"]) + f"scan with WhatsApp > Linked devices > Link a device (expires {body['expires_at']})"


def _qr_text(code: str) -> str:
    """The QR code drawn here from its payload: the payload is encoded, never printed."""
    from whatsappd.qr import to_text  # segno: only for the commands that draw a code

    return to_text(code, ansi=_tty())


def cmd_pair_code(client: Client, args: argparse.Namespace) -> tuple[Any, str]:
    raw, body = _check(client.post(f"/v1/companies/{args.id}/pair-code", {"phone": args.phone}))
    return raw, (f"pairing code: {body['code']} (valid until {body['expires_at']})\n"
                  "On the phone: WhatsApp > Linked devices > Link a device > Link with phone number "
                  "instead, then type the code.")


def cmd_logout(client: Client, args: argparse.Namespace) -> tuple[Any, str]:
    raw, body = _check(client.post(f"/v1/companies/{args.id}/logout"))
    text = (f"{args.id}: unlinked on WhatsApp and session wiped" if body.get("unlinked")
            else f"{args.id}: session wiped locally. {body.get('note', '')}".rstrip())
    return raw, text


def cmd_restart(client: Client, args: argparse.Namespace) -> tuple[Any, str]:
    raw, body = _check(client.post(f"/v1/companies/{args.id}/restart"))
    return raw, f"{args.id}: worker restarted; now {body['state']}"


def cmd_resume_sending(client: Client, args: argparse.Namespace) -> tuple[Any, str]:
    raw, body = _check(client.post(f"/v1/companies/{args.id}/sending/resume"))
    if body["resumed"]:
        return raw, f"{args.id}: sending resumed; its queued messages go again (pacing's rate still applies)"
    return raw, f"{args.id}: sending was not paused; nothing changed (now {body['sending']['state']})"


def cmd_connect(client: Client, args: argparse.Namespace) -> tuple[Any, str]:
    """Start the company; while pairing, draw each new QR code; return once connected."""
    raw, body = _check(client.post(f"/v1/companies/{args.id}/connect"))
    if args.no_wait or args.json:
        return raw, f"{args.id}: {body['state']}"
    deadline = time.monotonic() + args.wait
    drawn = None
    while time.monotonic() < deadline:
        raw, body = _check(client.get(f"/v1/companies/{args.id}"))
        state = body["state"]
        if state == "connected":
            return raw, f"{args.id}: connected as {body.get('jid')}"
        if state in RESTING:  # nothing more will happen without an operator (or a ban's expiry)
            error = body.get("last_error") or {}
            raise CommandFailed(f"{args.id}: {state}: {error.get('message') or body.get('reason')}")
        if state == "pairing":
            resp = client.get(f"/v1/companies/{args.id}/qr")
            if resp.ok and resp.json()["code"] != drawn:
                qr, qr_shown = _check(resp)
                drawn = qr["code"]
                if _tty():
                    sys.stdout.write("\x1b[2J\x1b[H")
                sys.stdout.write(_qr_text(qr["code"]))
                print(f"Scan with WhatsApp > Linked devices > Link a device (expires "
                      f"{qr_shown['expires_at']}); waiting...", flush=True)
        time.sleep(0.5)
    raise CommandFailed(f"{args.id}: not connected within {args.wait:g}s (state {body['state']})")


def cmd_send(client: Client, args: argparse.Namespace) -> tuple[Any, str]:
    headers = {"Idempotency-Key": args.idempotency_key} if args.idempotency_key else None
    path = f"/v1/companies/{args.id}/messages" + ("?wait=sent" if args.wait else "")
    raw, body = _check(client.post(path, {"to": args.to, "text": args.text}, headers=headers))
    text = f"{body['id']}: {body['status']}"
    if body.get("wa_id"):
        text += f" (WhatsApp id {body['wa_id']})"
    if body.get("error"):
        text += f": {body['error']['message']}"
    if body["status"] in ("failed", "expired"):
        raise CommandFailed(text, body=raw)
    return raw, text


def cmd_events(client: Client, args: argparse.Namespace) -> tuple[Any, str]:
    """Follow the event stream until interrupted; one line per event."""
    query = []
    if args.since is not None:
        query.append(f"since={args.since}")
    query += [f"company={c}" for c in args.company or []]
    query += [f"type={t}" for t in args.type or []]
    path = "/v1/events" + ("?" + "&".join(query) if query else "")
    client.timeout = None  # a stream may be quiet for long; heartbeats keep it alive
    try:
        for line in client.stream_lines(path):
            event = json.loads(line)
            if args.json:
                print(_json(event, separators=(",", ":")), flush=True)
                continue
            if event.get("type") == "heartbeat":
                continue
            extra = " ".join(f"{escape(k)}={escape(json.dumps(v, ensure_ascii=False))}" for k, v in event.items()
                             if k not in ("seq", "at", "type", "company"))
            print(f"{escape(event.get('seq', '-')):>8} {escape(event.get('at', ''))} "
                  f"{escape(event.get('company', '-'))} {escape(event.get('type'))} {extra}", flush=True)
    except StreamRefused as exc:
        _check(exc.response)
    except KeyboardInterrupt:
        pass
    return None, ""


def cmd_backup(client: Client, args: argparse.Namespace) -> tuple[Any, str]:
    """--to FILE (or a directory); --to -: the archive to stdout for a pipe, every word to stderr."""
    from whatsappd.backup.commands import (
        STDOUT,
        STDOUT_IS_TERMINAL,
        BackupFailed,
        fetch_backup,
        stdout_target,
        summary,
        target_path,
    )

    piped = stdout_target() if args.to == STDOUT else None
    if args.to == STDOUT and piped is None:
        raise CommandFailed(STDOUT_IS_TERMINAL)
    target = piped[0] if piped is not None else target_path(Path(args.to) if args.to else None)
    client.timeout = None  # a large state directory takes a while; the daemon answers when done
    try:
        manifest = fetch_backup(client, args.company or [], target)
    except BackupFailed as exc:
        raise CommandFailed(escape(str(exc)), body=exc.body) from None
    except OSError as exc:
        raise CommandFailed(f"cannot write {'stdout' if piped else target}: {exc.strerror or exc}") from None
    if piped is not None:  # stdout holds the archive: the summary goes to stderr, and main prints nothing
        text = summary(manifest, None, piped[1]())
        print(_json({"path": STDOUT, "manifest": manifest.data}, indent=2) if args.json else escape(text),
              file=sys.stderr)
        return None, ""
    assert isinstance(target, Path)
    return {"path": str(target), "manifest": manifest.data}, escape(summary(manifest, target))


# ---------------------------------------------------------------- add, remove, simulate, doctor
# What the README used to send people to curl for (issue 11).


def cmd_add(client: Client, args: argparse.Namespace) -> tuple[Any, str]:
    """PUT /v1/companies/ID with the fields given. A PUT replaces every field (one not given gets
    its default: engine neonize), so an existing company is changed only with --replace."""
    body = {key: value for key in ("name", "engine", "proxy") if (value := getattr(args, key)) is not None}
    if not args.replace and client.get(f"/v1/companies/{args.id}").status != 404:
        raise CommandFailed(f"company {escape(args.id)!r} already exists; --replace replaces all its fields (those "
                            "not given get their defaults: engine neonize, no name, no proxy)")
    resp = client.request("PUT", f"/v1/companies/{args.id}", body)
    raw, shown = _check(resp)
    verb = "added" if resp.status == 201 else "updated"
    return raw, f"{shown['id']}: {verb} (engine {shown['engine']}); now {shown['state']}" + (
        f". Pair it: whatsappctl connect {shown['id']}" if not shown.get("has_session") else "")


def cmd_remove(client: Client, args: argparse.Namespace) -> tuple[Any, str]:
    """DELETE /v1/companies/ID (?wipe=true also unlinks the device and deletes the session)."""
    raw, body = _check(client.request("DELETE", f"/v1/companies/{args.id}" + ("?wipe=true" if args.wipe else "")))
    if body.get("removed"):
        text = f"{args.id}: removed" + (" and its session wiped" if args.wipe else "")
    else:
        text = (f"{args.id}: stopped ({body.get('state')}); it is defined in the config file, so it stays "
                "listed until it is removed there (then whatsappctl reload)")
    return raw, text


def cmd_simulate(client: Client, args: argparse.Namespace) -> tuple[Any, str]:
    """POST /v1/companies/ID/simulate with the action and its KEY=VALUE arguments (JSON values)."""
    body: dict[str, Any] = {"action": args.action}
    for item in args.arg:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise CommandFailed(f"{escape(item)!r} is not KEY=VALUE (e.g. skew=120, push_name=Acme)", EXIT_USAGE)
        try:
            body[key] = json.loads(value)
        except ValueError:
            body[key] = value  # a bare word is a string: push_name=Acme
    raw, shown = _check(client.post(f"/v1/companies/{args.id}/simulate", body))
    return raw, f"{args.id}: {args.action}: " + ", ".join(f"{k} {v}" for k, v in shown.items() if k != "action")


def cmd_doctor(client: Client, args: argparse.Namespace) -> tuple[Any, str]:
    """GET /v1/doctor; exits 1 when anything is found (the findings on stdout all the same)."""
    from whatsappd.doctor import Finding, report_text

    raw, _ = _check(client.get("/v1/doctor"))
    findings = [Finding.from_json(f) for f in raw["findings"]]
    if findings:
        raise CommandFailed(report_text(findings), body=raw, to_stdout=True)
    return raw, report_text(findings)


def cmd_webhooks(client: Client, args: argparse.Namespace) -> tuple[Any, str]:
    """Each webhook: state, cursor, lag (journal events after its cursor), source, last error."""
    raw, body = _check(client.get("/v1/webhooks"))
    rows = [("ID", "STATE", "CURSOR", "LAG", "SOURCE", "LAST ERROR")]
    for w in body["webhooks"]:
        error = w.get("last_error") or {}
        note = f"{error['message']} (seq {error.get('seq')}, {error.get('at')})" if error and w["state"] != "ok" else ""
        if w.get("lost_events"):
            note = f"{w['lost_events']} events lost (pruned before delivery); {note}".rstrip("; ")
        rows.append((w["id"], w["state"], str(w["cursor"]), str(w["lag"]), w["source"], note))
    if len(rows) == 1:
        return raw, "no webhooks (add [[webhooks]] to the config, or PUT /v1/webhooks/ID)"
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    return raw, "\n".join(("  ".join(r[i].ljust(widths[i]) for i in range(5)) + "  " + r[5]).rstrip() for r in rows)


def _tty() -> bool:
    return sys.stdout.isatty()


def _json(value: Any, **kw: Any) -> str:
    """JSON for --json: ASCII only (every control character escaped), DEL too."""
    return json.dumps(value, **kw).replace("\x7f", "\\u007f")


COMMANDS: dict[str, tuple[str, Callable[[Client, argparse.Namespace], tuple[Any, str]]]] = {
    "health": ("is the daemon up; version, uptime, companies by state", cmd_health),
    "list": ("every company with its state", cmd_list),
    "status": ("one company: state, since, jid, last error, reconnect, worker", cmd_status),
    "connect": ("start a company; shows the QR while pairing and waits until connected", cmd_connect),
    "qr": ("show the current QR code (terminal, --json, or --png FILE)", cmd_qr),
    "pair-code": ("pair with a phone number instead of a QR: prints the code to type", cmd_pair_code),
    "logout": ("unlink the device on WhatsApp and wipe the session", cmd_logout),
    "restart": ("restart a company's worker", cmd_restart),
    "resume-sending": ("end a company's rate-limit pause now: its queued messages go again", cmd_resume_sending),
    "send": ("queue a text message: send ID TO TEXT", cmd_send),
    "events": ("follow the event stream (backlog after --since, then live)", cmd_events),
    "reload": ("reload the config now; returns once applied or failed", cmd_reload),
    "backup": ("write a backup archive of the running daemon (--to FILE, --company ID)", cmd_backup),
    "add": ("add a company (or update one added here): add ID --name NAME --engine ENGINE [--proxy URL]", cmd_add),
    "remove": ("remove a company (--wipe: also unlink it on WhatsApp and delete its session)", cmd_remove),
    "simulate": ("drive a simulator company: simulate ID ACTION [KEY=VALUE ...]", cmd_simulate),
    "doctor": ("is anything wrong? one line per finding with its fix; exit 1 if any", cmd_doctor),
    "webhooks": ("every webhook: state, cursor, lag, source, last error", cmd_webhooks),
}


def _global_options(parser: argparse.ArgumentParser, default: Any) -> None:
    """--socket, --json, --timeout: on the main parser and again on each command, so that they
    may come before or after the command (`whatsappctl health --json`). The commands' copies
    default to SUPPRESS, so they never overwrite a value given before the command."""
    parser.add_argument("--socket", metavar="PATH", default=default(None),
                        help="control socket (default: $WHATSAPPD_SOCKET, else your own daemon's socket if "
                             "there is one, else the system service's, /run/whatsappd/control.sock)")
    parser.add_argument("--json", action="store_true", default=default(False),
                        help="print the daemon's JSON answer (for scripts)")
    parser.add_argument("--timeout", type=float, default=default(30.0), metavar="SECONDS",
                        help="seconds to wait for an answer (default 30)")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="whatsappctl", description="Control a running whatsappd.")
    parser.add_argument("--version", action="version", version=f"whatsappctl {__version__}")
    _global_options(parser, lambda value: value)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (help_text, _) in COMMANDS.items():
        cmd = sub.add_parser(name, help=help_text)
        _global_options(cmd, lambda value: argparse.SUPPRESS)
        if name in ("status", "connect", "qr", "pair-code", "logout", "restart", "resume-sending", "send"):
            cmd.add_argument("id", help="company id")
        if name == "pair-code":
            cmd.add_argument("phone", help="the phone number in international format, e.g. +5511999999999")
        if name == "connect":
            cmd.add_argument("--wait", type=float, default=200.0, metavar="SECONDS",
                             help="how long to wait for the connection (default 200, beyond the QR window)")
            cmd.add_argument("--no-wait", action="store_true", help="return at once after starting it")
        if name == "send":
            cmd.add_argument("to", help="phone number in international format, or a JID")
            cmd.add_argument("text", help="the message text")
            cmd.add_argument("--wait", action="store_true", help="wait until it is sent (or fails)")
            cmd.add_argument("--idempotency-key", metavar="KEY", help="never send twice for the same KEY")
        if name == "events":
            cmd.add_argument("--since", type=int, metavar="SEQ", help="start after this sequence number (0: all kept)")
            cmd.add_argument("--company", action="append", metavar="ID", help="only this company (repeatable)")
            cmd.add_argument("--type", action="append", metavar="TYPE", help="only this event type (repeatable)")
        if name == "backup":
            cmd.add_argument("--to", metavar="FILE", help="the archive to write, or a directory for it; -: stdout, "
                             "for a pipe into age or gpg (never a terminal)")
            cmd.add_argument("--company", action="append", metavar="ID", help="only this company (repeatable)")
        if name == "qr":
            cmd.add_argument("--png", metavar="FILE", help="write the QR code as a PNG image to FILE")
        _admin_arguments(name, cmd)
    return parser


def _admin_arguments(name: str, cmd: argparse.ArgumentParser) -> None:
    """The arguments of add, remove, simulate (doctor has none)."""
    from whatsappd.config import ENGINES
    from whatsappd.protocol import SIMULATE_ACTIONS

    if name in ("add", "remove", "simulate"):
        cmd.add_argument("id", help="company id")
    if name == "add":
        cmd.add_argument("--name", help="a display name")
        cmd.add_argument("--engine", choices=ENGINES, help="neonize (the real WhatsApp; the default) or simulator")
        cmd.add_argument("--proxy", metavar="URL", help="e.g. socks5://127.0.0.1:1080")
        cmd.add_argument("--replace", action="store_true",
                         help="replace an existing company added at runtime (every field: give them all)")
    if name == "remove":
        cmd.add_argument("--wipe", action="store_true",
                         help="also unlink the device on WhatsApp and delete the session (cannot be undone)")
    if name == "simulate":
        cmd.add_argument("action", choices=list(SIMULATE_ACTIONS), metavar="ACTION",
                         help="one of: " + ", ".join(SIMULATE_ACTIONS))
        cmd.add_argument("arg", nargs="*", metavar="KEY=VALUE",
                         help="the action's arguments; VALUE is JSON if it parses (120, true, [\"a\"]), else a string")


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    _, handler = COMMANDS[args.command]
    try:
        socket_path = args.socket or default_socket()
    except CommandFailed as exc:
        print(f"whatsappctl: {exc}", file=sys.stderr)
        return exc.exit_status
    client = Client(socket_path, timeout=args.timeout)
    try:
        body, text = handler(client, args)
    except DaemonUnavailable as exc:
        print(f"whatsappctl: {exc}", file=sys.stderr)
        return EXIT_UNAVAILABLE
    except TimeoutError:
        print(f"whatsappctl: no answer from {socket_path} within {args.timeout:g}s", file=sys.stderr)
        return EXIT_UNAVAILABLE
    except CommandFailed as exc:
        if args.json and exc.body is not None:
            print(_json(exc.body, indent=2))
        if exc.to_stdout:
            if not args.json:
                print(exc)
        else:
            print(f"whatsappctl: {exc}", file=sys.stderr)
        return exc.exit_status
    if args.json and body is not None:
        print(_json(body, indent=2))
    elif text:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
