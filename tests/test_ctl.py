"""whatsappctl (the installed console script) against a real daemon: health, list, reload, errors."""

from __future__ import annotations

import json
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from whatsappd import __version__
from whatsappd.testing.daemon import NOBODY, DaemonProcess, clean_env, ctl_command, run_ctl, whatsappd_command

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


def test_global_options_may_follow_the_command(module_daemon: DaemonProcess) -> None:
    """--json, --socket and --timeout work after the command as well as before it."""
    result = run_ctl("health", "--json", "--socket", str(module_daemon.socket_path), "--timeout", "10")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["pid"] == module_daemon.pid
    result = run_ctl("--socket", str(module_daemon.socket_path), "list", "--json")
    assert result.returncode == 0, result.stderr
    assert [c["id"] for c in json.loads(result.stdout)["companies"]] == ["acme", "beta"]
    # Given before the command, an option is not reset by the command's own copy of it.
    result = run_ctl("--json", "--socket", str(module_daemon.socket_path), "health")
    assert result.returncode == 0 and json.loads(result.stdout)["status"] == "ok"


def test_both_programs_print_their_version() -> None:
    """`whatsappctl --version` and `whatsappd --version` print the package version and exit 0."""
    ctl = run_ctl("--version")
    assert (ctl.returncode, ctl.stdout) == (0, f"whatsappctl {__version__}\n")
    daemon = subprocess.run([*whatsappd_command(), "--version"], env=clean_env(), capture_output=True,
                            text=True, timeout=30)
    assert (daemon.returncode, daemon.stdout) == (0, f"whatsappd {__version__}\n")


# ---------------------------------------------------------------------------------------------
# Finding the socket: a CRM user in the socket's group runs plain `whatsappctl health`.
#
# The system layout (/run/whatsappd/control.sock in a 0750 directory of group whatsappd, and
# /etc/whatsappd/whatsappd.toml readable by that group) is built in a private mount namespace,
# so the machine's own /run and /etc are never touched: /run is a fresh tmpfs there with the
# test daemon's socket directory bound on /run/whatsappd, and /etc an overlay that adds the
# config file and the group. whatsappctl then runs there as uid 65534, in or out of the group.

GROUP = 4242
_SYSTEM_LAYOUT = r"""
set -e
mount -t tmpfs -o mode=0755 tmpfs /run
mkdir /run/whatsappd
mount --bind "$1" /run/whatsappd
mkdir "$2/upper" "$2/work"
mount -t overlay overlay -o "lowerdir=/etc,upperdir=$2/upper,workdir=$2/work" /etc
echo "whatsappd:x:$3:" >> /etc/group
mkdir -p /etc/whatsappd
install -m 0640 -g "$3" "$2/whatsappd.toml" /etc/whatsappd/whatsappd.toml
shift 3
exec "$@"
"""


def _in_system_layout(shared: Path, run_dir: Path, member: bool, *args: str) -> subprocess.CompletedProcess[str]:
    """Run whatsappctl ARGS as uid 65534 (in group whatsappd if member) with run_dir as /run/whatsappd."""
    work = Path(tempfile.mkdtemp(dir=shared))
    (work / "whatsappd.toml").write_text('[logging]\nlevel = "info"\n')  # no socket_path: the default
    groups = f"--groups={GROUP}" if member else "--clear-groups"
    command = ["unshare", "--mount", "--propagation", "private", "sh", "-c", _SYSTEM_LAYOUT, "sh",
               str(run_dir), str(work), str(GROUP),
               "setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", groups, "--", *ctl_command(), *args]
    env = clean_env(HOME=str(shared / "nobody-home"), XDG_RUNTIME_DIR=str(shared / "nobody-xdg"))
    env.pop("XDG_STATE_HOME", None)
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=60, cwd="/",
                          stdin=subprocess.DEVNULL)


def _system_run_dir(path: Path) -> Path:
    """Make path what systemd's RuntimeDirectory= makes /run/whatsappd: root:whatsappd 0750."""
    path.mkdir(exist_ok=True)
    os.chown(path, 0, GROUP)
    path.chmod(0o750)
    return path


def _system_daemon(daemon_factory: Callable[..., DaemonProcess], run_dir: Path) -> DaemonProcess:
    """A daemon serving run_dir/control.sock as the unit would: the directory root:whatsappd 0750,
    the socket in group whatsappd."""
    daemon = daemon_factory("", socket_path=run_dir / "control.sock").start()
    _system_run_dir(run_dir)
    os.chown(daemon.socket_path, 0, GROUP)
    return daemon


@pytest.fixture
def system_layout(shared_dir: Path, second_user: Callable[..., Any]) -> Path:
    """shared_dir, once a private mount namespace with the system layout works here (else skip)."""
    second_user()
    if not shutil.which("unshare") or not shutil.which("setpriv"):
        pytest.skip("needs unshare and setpriv (util-linux) to build /run/whatsappd in a mount namespace")
    probe = _in_system_layout(shared_dir, _system_run_dir(shared_dir / "probe"), True, "--help")
    if probe.returncode != 0:
        pytest.skip(f"cannot build the system layout in a private mount namespace here: {probe.stderr.strip()}")
    return shared_dir


@pytest.mark.root
def test_a_member_of_the_group_finds_the_system_socket_by_default(
    daemon_factory: Callable[..., DaemonProcess], system_layout: Path
) -> None:
    """In group whatsappd, `whatsappctl health` finds the system socket despite a config file without socket_path; own daemon first."""
    run_dir = system_layout / "run"
    daemon = _system_daemon(daemon_factory, run_dir)
    result = _in_system_layout(system_layout, run_dir, True, "health")
    assert result.returncode == 0, result.stderr
    assert f"pid {daemon.pid}" in result.stdout.splitlines()[0]

    # The user's own daemon (where their `whatsappd run` puts its socket) wins when it is there.
    own_socket = system_layout / "nobody-xdg" / "whatsappd" / "control.sock"
    own = daemon_factory('[control]\nsocket_mode = "0666"\n', socket_path=own_socket).start()
    (system_layout / "nobody-xdg").chmod(0o755)
    result = _in_system_layout(system_layout, run_dir, True, "health")
    assert result.returncode == 0, result.stderr
    assert f"pid {own.pid}" in result.stdout.splitlines()[0]
    assert own.stop() == 0 and daemon.stop() == 0


@pytest.mark.root
def test_a_user_outside_the_group_is_told_to_join_it_in_one_sentence(
    daemon_factory: Callable[..., DaemonProcess], system_layout: Path
) -> None:
    """Not in group whatsappd: exit 3 and one line naming the socket and the group to join, no traceback."""
    run_dir = system_layout / "run"
    daemon = _system_daemon(daemon_factory, run_dir)
    result = _in_system_layout(system_layout, run_dir, False, "health")
    user = pwd.getpwuid(NOBODY).pw_name
    assert (result.returncode, result.stdout) == (3, "")
    assert result.stderr == (
        "whatsappctl: permission denied on /run/whatsappd/control.sock: add yourself to group whatsappd "
        f"(usermod -aG whatsappd {user}, then log in again) or run as root\n")
    assert daemon.stop() == 0


@pytest.mark.root
def test_no_daemon_anywhere_names_both_sockets_looked_for(system_layout: Path) -> None:
    """Neither the system socket nor the user's own exists: exit 3, one line naming both."""
    result = _in_system_layout(system_layout, _system_run_dir(system_layout / "empty"), True, "health")
    own = system_layout / "nobody-xdg" / "whatsappd" / "control.sock"
    assert (result.returncode, result.stdout) == (3, "")
    assert result.stderr == (
        "whatsappctl: the daemon is not running: no socket at /run/whatsappd/control.sock (the system "
        f"service) nor at {own} (a whatsappd run started by you). Start it (systemctl start whatsappd, "
        "or whatsappd run) or point --socket at its socket\n")
