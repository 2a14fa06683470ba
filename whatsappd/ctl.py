"""`whatsappctl`: the sysadmin's client for the control socket.

Human output by default, `--json` for scripts. Exit codes: 0 success, 1 the daemon answered
with an error, 2 usage error, 3 the daemon cannot be reached.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from whatsappd.client import Client, DaemonUnavailable, Response
from whatsappd.config import ConfigError, default_paths, load_config

__all__ = ["main"]

EXIT_ERROR, EXIT_USAGE, EXIT_UNAVAILABLE = 1, 2, 3


class Failure(Exception):
    def __init__(self, message: str, code: int = EXIT_ERROR, body: Any = None) -> None:
        super().__init__(message)
        self.code = code
        self.body = body


def default_socket() -> str:
    """--socket's default: $WHATSAPPD_SOCKET, else the config file's, else the built-in default."""
    if os.environ.get("WHATSAPPD_SOCKET"):
        return os.environ["WHATSAPPD_SOCKET"]
    try:
        return str(load_config().control_socket_path)
    except (ConfigError, OSError):
        return str(default_paths()[1])


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    parts = []
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            parts.append(f"{seconds // size}{unit}")
            seconds %= size
    parts.append(f"{seconds}s")
    return "".join(parts[:2])


def _check(resp: Response) -> Any:
    try:
        body = resp.json()
    except ValueError:
        raise Failure(f"HTTP {resp.status}: {resp.body[:200].decode(errors='replace')}") from None
    if not resp.ok:
        error = body.get("error", {}) if isinstance(body, dict) else {}
        message = error.get("message", f"HTTP {resp.status}")
        problems = error.get("problems") or []
        detail = "".join(f"\n  - {p}" for p in problems)
        raise Failure(f"{message} [{error.get('code', resp.status)}]{detail}", body=body)
    return body


def cmd_health(client: Client, args: argparse.Namespace) -> tuple[Any, str]:
    body = _check(client.get("/v1/health"))
    by_state = body["companies"]["by_state"]
    states = ", ".join(f"{n} {s}" for s, n in sorted(by_state.items())) or "none"
    text = (f"whatsappd {body['version']}: {body['status']}, up {_duration(body['uptime_seconds'])}, "
            f"pid {body['pid']}\n"
            f"socket:    {body['socket']}\n"
            f"config:    {body['config']['source']}\n"
            f"companies: {body['companies']['total']} ({states})")
    last = body["config"].get("last_reload")
    if last and not last.get("ok"):
        text += f"\nlast reload FAILED at {last['at']}: " + "; ".join(last.get("problems", []))
    return body, text


def cmd_list(client: Client, args: argparse.Namespace) -> tuple[Any, str]:
    body = _check(client.get("/v1/companies"))
    rows = [("ID", "STATE", "SINCE", "NAME")]
    for c in body["companies"]:
        rows.append((c["id"], c["state"], c["since"], c.get("name", "")))
    if len(rows) == 1:
        return body, "no companies (add [[companies]] to the config, or PUT /v1/companies/ID)"
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    lines = ["  ".join(r[i].ljust(widths[i]) for i in range(3)) + "  " + r[3] for r in rows]
    return body, "\n".join(line.rstrip() for line in lines)


def cmd_reload(client: Client, args: argparse.Namespace) -> tuple[Any, str]:
    body = _check(client.post("/v1/reload"))
    parts = [f"{key} {', '.join(body[key])}" for key in ("added", "removed", "changed") if body[key]]
    if body["settings"]:
        parts.append(f"settings {', '.join(body['settings'])}")
    text = f"configuration reloaded from {body['source']}: " + ("; ".join(parts) if parts else "no changes")
    if body["restart_required"]:
        text += f"\nnote: {', '.join(body['restart_required'])} apply only after a restart"
    return body, text


COMMANDS: dict[str, tuple[str, Callable[[Client, argparse.Namespace], tuple[Any, str]]]] = {
    "health": ("is the daemon up; version, uptime, companies by state", cmd_health),
    "list": ("every company with its state", cmd_list),
    "reload": ("reload the config now; returns once applied or failed", cmd_reload),
}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="whatsappctl", description="Control a running whatsappd.")
    parser.add_argument("--socket", metavar="PATH",
                        help="control socket (default: $WHATSAPPD_SOCKET, else the config's control.socket_path)")
    parser.add_argument("--json", action="store_true", help="print the daemon's JSON answer (for scripts)")
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for an answer (default 30)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (help_text, _) in COMMANDS.items():
        sub.add_parser(name, help=help_text)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    socket_path = args.socket or default_socket()
    client = Client(socket_path, timeout=args.timeout)
    _, handler = COMMANDS[args.command]
    try:
        body, text = handler(client, args)
    except DaemonUnavailable as exc:
        print(f"whatsappctl: {exc}", file=sys.stderr)
        return EXIT_UNAVAILABLE
    except TimeoutError:
        print(f"whatsappctl: no answer from {socket_path} within {args.timeout:g}s", file=sys.stderr)
        return EXIT_UNAVAILABLE
    except Failure as exc:
        if args.json and exc.body is not None:
            print(json.dumps(exc.body, indent=2))
        print(f"whatsappctl: {exc}", file=sys.stderr)
        return exc.code
    print(json.dumps(body, indent=2) if args.json else text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
