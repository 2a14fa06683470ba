"""whatsappd.logs: the format follows where stderr goes; priorities, company=, redaction."""

from __future__ import annotations

import json
import logging
import os
import pty
import re
from collections.abc import Iterator
from pathlib import Path
from typing import IO

import pytest

from whatsappd.logs import configure_logging, detect_format, get_logger
from whatsappd.testing.daemon import DaemonProcess

pytestmark = pytest.mark.usefixtures("restore_logging")


@pytest.fixture
def log_file(tmp_path: Path) -> Iterator[IO[str]]:
    """A real file to log into (what a service's stderr is when it is not the journal)."""
    with open(tmp_path / "stderr.log", "w+", encoding="utf-8") as stream:
        yield stream


def _journal_env(stream: IO[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """Make the stream look like systemd's journal stream (JOURNAL_STREAM = its dev:ino)."""
    st = os.fstat(stream.fileno())
    monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino}")


def _lines(stream: IO[str]) -> list[str]:
    for handler in logging.getLogger().handlers:
        handler.flush()
    stream.seek(0)
    return stream.read().splitlines()


def test_journal_stream_gets_logfmt_with_syslog_priorities(log_file: IO[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """Under journald: `<N>` + logfmt, 6 info, 4 warning, 3 error, 7 debug, and no timestamp."""
    _journal_env(log_file, monkeypatch)
    assert configure_logging("auto", "debug", stream=log_file) == "journal"
    log = get_logger()
    log.debug("looking", n=1)
    log.info("company connected", company="acme", jid="5511@s.whatsapp.net")
    log.warning("slow worker", company="beta", seconds=2.5)
    log.error("worker crashed", company="acme", exit_code=-9)
    lines = _lines(log_file)
    assert lines == [
        "<7>event=looking n=1 level=debug",
        '<6>event="company connected" company=acme jid=5511@s.whatsapp.net level=info',
        '<4>event="slow worker" company=beta seconds=2.5 level=warning',
        '<3>event="worker crashed" company=acme exit_code=-9 level=error',
    ]
    assert not any("timestamp" in line for line in lines)


def test_journal_routes_stdlib_loggers_too(log_file: IO[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """Records from stdlib loggers (aiohttp, neonize's Python side) get the same prefix and format."""
    _journal_env(log_file, monkeypatch)
    configure_logging("auto", "info", stream=log_file)
    logging.getLogger("aiohttp.server").warning("Error handling request %s", "x")
    logging.getLogger("neonize").info("connected")
    logging.getLogger("aiohttp.access").info("GET /v1/health")  # duplicates our request line: dropped
    assert _lines(log_file) == [
        '<4>event="Error handling request x" level=warning',
        "<6>event=connected level=info",
    ]


def test_journal_keeps_a_traceback_in_one_entry(log_file: IO[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """A multi-line exception stays one journal line with the error priority (no unprefixed lines)."""
    _journal_env(log_file, monkeypatch)
    configure_logging("journal", "info", stream=log_file)
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        get_logger().exception("request failed", company="acme")
    lines = _lines(log_file)
    assert len(lines) == 1
    assert lines[0].startswith('<3>event="request failed" company=acme ')
    assert "Traceback" in lines[0] and "RuntimeError: boom" in lines[0]


def test_json_elsewhere_with_a_timestamp(log_file: IO[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """A file that is not the journal's stream gets one JSON object per line with an ISO timestamp."""
    monkeypatch.setenv("JOURNAL_STREAM", "1:1")  # some other stream: not ours
    assert configure_logging("auto", "info", stream=log_file) == "json"
    get_logger().info("whatsappd ready", company="acme", companies=3)
    (line,) = _lines(log_file)
    entry = json.loads(line)
    assert entry["event"] == "whatsappd ready" and entry["company"] == "acme" and entry["level"] == "info"
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d+Z", entry["timestamp"])


def test_detect_format_follows_the_stream(log_file: IO[str]) -> None:
    """journal when JOURNAL_STREAM names the stream, console on a terminal, JSON otherwise."""
    st = os.fstat(log_file.fileno())
    assert detect_format(log_file, {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}) == "journal"
    assert detect_format(log_file, {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino + 1}"}) == "json"
    assert detect_format(log_file, {}) == "json"
    main, other = pty.openpty()
    try:
        with open(other, "w", closefd=False) as tty:
            assert detect_format(tty, {}) == "console"
    finally:
        os.close(main)
        os.close(other)


def test_console_on_a_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    """On a TTY, auto picks the console renderer: readable text, not JSON or logfmt."""
    monkeypatch.delenv("JOURNAL_STREAM", raising=False)
    main, other = pty.openpty()
    try:
        with open(other, "w", closefd=False) as tty:
            assert configure_logging("auto", "info", stream=tty) == "console"
            get_logger().info("whatsappd ready", company="acme")
            tty.flush()
            output = os.read(main, 4096).decode(errors="replace")
    finally:
        os.close(main)
        os.close(other)
    assert "whatsappd ready" in output and "acme" in output
    assert not output.startswith(("{", "<"))


def test_explicit_format_overrides_detection(log_file: IO[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """logging.format = "json" wins even on the journal's stream (and "journal" anywhere)."""
    _journal_env(log_file, monkeypatch)
    assert configure_logging("json", "info", stream=log_file) == "json"
    get_logger().info("one")
    assert json.loads(_lines(log_file)[0])["event"] == "one"


def test_level_filters(log_file: IO[str]) -> None:
    """log_level = warning drops info and debug, from our loggers and stdlib ones."""
    configure_logging("json", "warning", stream=log_file)
    get_logger().info("hidden")
    get_logger().debug("hidden too")
    logging.getLogger("aiohttp.server").info("hidden as well")
    get_logger().warning("shown")
    assert [json.loads(line)["event"] for line in _lines(log_file)] == ["shown"]


def test_configuring_again_replaces_the_handler(log_file: IO[str]) -> None:
    """A reload that reconfigures logging does not duplicate every line."""
    configure_logging("json", "info", stream=log_file)
    configure_logging("json", "info", stream=log_file)
    get_logger().info("once")
    assert len(_lines(log_file)) == 1


@pytest.mark.parametrize("key", ["qr", "code", "text", "pair_code", "body", "key", "token"])
def test_secrets_are_redacted_at_info_and_above(key: str, log_file: IO[str]) -> None:
    """QR codes, pairing codes, message bodies and keys never appear at info, warning or error."""
    configure_logging("json", "debug", stream=log_file)
    log = get_logger()
    secret = "2@S3cr3tQrPayload,abc=="
    log.info("pairing", company="acme", **{key: secret})
    log.warning("pairing", company="acme", **{key: secret})
    log.error("pairing", company="acme", **{key: secret})
    lines = _lines(log_file)
    assert len(lines) == 3
    for line in lines:
        assert secret not in line
        assert json.loads(line)[key] == "[redacted]"


def test_secrets_are_visible_at_debug(log_file: IO[str]) -> None:
    """At debug level, a debug line shows the QR, code and text (for development only)."""
    configure_logging("json", "debug", stream=log_file)
    get_logger().debug("qr received", company="acme", qr="2@abc", code="ABCD-EFGH", text="olá")
    entry = json.loads(_lines(log_file)[0])
    assert (entry["qr"], entry["code"], entry["text"]) == ("2@abc", "ABCD-EFGH", "olá")


def test_secrets_in_stdlib_extras_are_redacted(log_file: IO[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """A stdlib logger passing a secret through `extra` is redacted like our own lines."""
    _journal_env(log_file, monkeypatch)
    configure_logging("auto", "info", stream=log_file)
    logging.getLogger("neonize").info("pair code", extra={"code": "ABCD-EFGH"})
    (line,) = _lines(log_file)
    assert "ABCD-EFGH" not in line and line.endswith(" code=[redacted]")
    assert line.startswith("<6>")


def test_daemon_logs_to_the_journal_format_under_journald(tmp_path: Path) -> None:
    """A real daemon whose stderr is JOURNAL_STREAM writes `<6>` logfmt lines, the socket named."""
    root = tmp_path / "d"
    root.mkdir()
    daemon = DaemonProcess(root, config='[[companies]]\nid = "acme"\nengine = "simulator"\n')
    daemon.log_path.touch()
    st = daemon.log_path.stat()
    daemon.env["JOURNAL_STREAM"] = f"{st.st_dev}:{st.st_ino}"
    daemon.start()
    try:
        daemon.config_path.write_text(daemon.config_path.read_text() + '[[companies]]\nid = "beta"\n'
                                      'engine = "simulator"\n')
        assert daemon.client.post("/v1/reload").status == 200
    finally:
        assert daemon.stop() == 0
    lines = daemon.logs().splitlines()
    ready = next(line for line in lines if line.startswith('<6>event="whatsappd ready"'))
    assert f"socket={daemon.socket_path}" in ready
    assert '<6>event="company added by reload" company=beta level=info' in lines
    assert all(re.match(r"<[0-7]>event=", line) for line in lines), lines
    assert not any("timestamp" in line for line in lines)
