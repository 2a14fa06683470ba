"""whatsappctl (the installed console script) against a real daemon: health, list, reload, errors."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from whatsappd import __version__
from whatsappd.testing.daemon import DaemonProcess, clean_env, run_ctl

COMPANIES = ('[[companies]]\nid = "acme"\nname = "ACME Imóveis"\nengine = "simulator"\n'
             '[[companies]]\nid = "beta"\nengine = "simulator"\n')


@pytest.fixture(scope="module")
def module_daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaemonProcess]:
    """One daemon for the read-only commands of this module (starting one per test is waste)."""
    daemon = DaemonProcess(tmp_path_factory.mktemp("ctl"), config=COMPANIES).start()
    yield daemon
    try:
        assert daemon.stop() == 0
    finally:
        daemon.kill()


def _ctl(daemon: DaemonProcess, *args: str) -> tuple[int, str, str]:
    result = run_ctl("--socket", str(daemon.socket_path), *args)
    return result.returncode, result.stdout, result.stderr


def test_health_human_output(module_daemon: DaemonProcess) -> None:
    """`whatsappctl health`: version, status, pid, socket, config and companies by state; exit 0."""
    code, out, err = _ctl(module_daemon, "health")
    assert code == 0 and err == ""
    lines = out.splitlines()
    assert lines[0].startswith(f"whatsappd {__version__}: ok, up ")
    assert lines[0].endswith(f", pid {module_daemon.pid}")
    assert f"socket:    {module_daemon.socket_path}" in lines
    assert f"config:    {module_daemon.config_path}" in lines
    assert "companies: 2 (2 stopped)" in lines


def test_health_json_output(module_daemon: DaemonProcess) -> None:
    """`whatsappctl --json health` prints the daemon's JSON answer, for scripts."""
    code, out, _ = _ctl(module_daemon, "--json", "health")
    assert code == 0
    body = json.loads(out)
    assert body["status"] == "ok" and body["pid"] == module_daemon.pid
    assert body["companies"] == {"total": 2, "by_state": {"stopped": 2}}


def test_list_human_and_json(module_daemon: DaemonProcess) -> None:
    """`whatsappctl list` is a table with a header and one row per company; --json is the API answer."""
    code, out, _ = _ctl(module_daemon, "list")
    assert code == 0
    header, *rows = out.splitlines()
    assert header.split() == ["ID", "STATE", "SINCE", "NAME"]
    assert [row.split()[:2] for row in rows] == [["acme", "stopped"], ["beta", "stopped"]]
    assert rows[0].endswith("ACME Imóveis")
    code, out, _ = _ctl(module_daemon, "--json", "list")
    assert code == 0
    assert [c["id"] for c in json.loads(out)["companies"]] == ["acme", "beta"]


def test_list_without_companies_says_how_to_add_one(daemon_factory: Callable[..., DaemonProcess]) -> None:
    """An empty list is a sentence saying how to add a company, not an empty table."""
    daemon = daemon_factory("").start()
    code, out, _ = _ctl(daemon, "list")
    assert code == 0 and out.startswith("no companies (add [[companies]] to the config")
    assert daemon.stop() == 0


def test_reload_success_and_failure(daemon_factory: Callable[..., DaemonProcess]) -> None:
    """`whatsappctl reload` reports the diff; a broken file exits 1 listing each problem; --json prints the error."""
    daemon = daemon_factory(COMPANIES).start()
    assert daemon.config_path is not None
    good = daemon.config_path.read_text()
    daemon.config_path.write_text(good + '[[companies]]\nid = "gamma"\nengine = "simulator"\n')
    code, out, err = _ctl(daemon, "reload")
    assert code == 0, err
    assert out.strip() == f"configuration reloaded from {daemon.config_path}: added gamma"

    code, out, _ = _ctl(daemon, "reload")
    assert code == 0 and out.strip().endswith(": no changes")

    daemon.config_path.write_text(good.replace('id = "beta"', 'id = "Bad"') + '[logging]\nlevel = "loud"\n')
    code, out, err = _ctl(daemon, "reload")
    assert code == 1 and out == ""
    first, *problems = err.strip().splitlines()
    assert first.startswith("whatsappctl: the configuration was not reloaded: ")
    assert first.endswith("[config_invalid]")
    assert len(problems) == 2, problems
    assert problems[0].startswith('  - logging.level = "loud": expected one of')
    assert problems[1].startswith("  - companies[1].id = 'Bad': 'Bad' is not a valid company id")

    code, out, _ = _ctl(daemon, "--json", "reload")
    assert code == 1
    assert json.loads(out)["error"]["code"] == "config_invalid"

    # The failed reloads changed nothing, and health says the last one failed.
    code, out, _ = _ctl(daemon, "health")
    assert code == 0 and "companies: 3 (3 stopped)" in out
    assert "last reload FAILED at " in out and "companies[1].id = 'Bad'" in out
    assert daemon.stop() == 0


def test_socket_from_environment(module_daemon: DaemonProcess) -> None:
    """WHATSAPPD_SOCKET names the socket when --socket is not given; --socket wins over it."""
    env = clean_env(WHATSAPPD_SOCKET=str(module_daemon.socket_path))
    result = run_ctl("health", env=env)
    assert result.returncode == 0, result.stderr
    env = clean_env(WHATSAPPD_SOCKET="/nonexistent/control.sock")
    result = run_ctl("--socket", str(module_daemon.socket_path), "health", env=env)
    assert result.returncode == 0, result.stderr


def test_daemon_not_running_is_one_clear_sentence(tmp_path: Path) -> None:
    """No daemon: exit 3 and one line naming the socket and what to do; nothing on stdout."""
    missing = tmp_path / "control.sock"
    result = run_ctl("--socket", str(missing), "health")
    assert result.returncode == 3 and result.stdout == ""
    assert result.stderr.count("\n") == 1
    assert result.stderr == (
        f"whatsappctl: the daemon is not running: nothing answers on {missing} (no socket file there). "
        "Start it (systemctl start whatsappd, or whatsappd run) or point --socket at its socket\n"
    )


def test_stale_socket_file_is_reported_as_not_running(tmp_path: Path) -> None:
    """A socket file nobody listens on (daemon crashed): the same sentence, 'connection refused'."""
    path = tmp_path / "control.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as dead:
        dead.bind(str(path))
    result = run_ctl("--socket", str(path), "list")
    assert result.returncode == 3
    assert f"nothing answers on {path} (connection refused)" in result.stderr
    assert result.stderr.count("\n") == 1


def test_env_socket_not_running_names_that_socket(tmp_path: Path) -> None:
    """With the socket from WHATSAPPD_SOCKET, the error names that path."""
    path = tmp_path / "from-env.sock"
    result = run_ctl("reload", env=clean_env(WHATSAPPD_SOCKET=str(path)))
    assert result.returncode == 3 and str(path) in result.stderr


def test_usage_error_exits_2() -> None:
    """An unknown command is a usage error (exit 2), not a connection attempt."""
    result = run_ctl("frobnicate")
    assert result.returncode == 2 and "invalid choice" in result.stderr


def test_daemon_at_its_connection_cap_is_a_clear_error(daemon_factory: Callable[..., DaemonProcess]) -> None:
    """At max_connections, whatsappctl prints the daemon's 503 sentence and exits 1, never a traceback."""
    daemon = daemon_factory("[control]\nmax_connections = 1\n").start()
    held = None
    for _ in range(100):  # until our connection is the one the daemon counts
        held = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        held.settimeout(10)
        held.connect(str(daemon.socket_path))
        try:
            held.sendall(b"GET /v1/health HTTP/1.1\r\nHost: x\r\n\r\n")
            if held.recv(12) == b"HTTP/1.1 200":
                break
        except BrokenPipeError:
            pass
        held.close()
        time.sleep(0.05)
    else:
        pytest.fail("the daemon never served a held connection")
    assert held is not None
    with held:
        for _ in range(3):
            code, out, err = _ctl(daemon, "health")
            assert (code, out) == (1, "")
            assert err == ("whatsappctl: the daemon has reached control.max_connections open connections; "
                           "retry shortly [too_many_connections]\n")
    assert daemon.stop() == 0
