"""The daemon's life, end to end on real subprocesses: fresh start, socket rules, reload, stop."""

from __future__ import annotations

import grp
import os
import signal
import stat
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from whatsappd.config import DEFAULT_CONFIG_PATH
from whatsappd.testing.daemon import DaemonProcess, run_ctl, wait_until, whatsappd_command

TWO = '[[companies]]\nid = "acme"\nengine = "simulator"\n[[companies]]\nid = "beta"\nengine = "simulator"\n'


def _ids(daemon: DaemonProcess) -> list[str]:
    return [c["id"] for c in daemon.client.get("/v1/companies").json()["companies"]]


def _wait_reload(daemon: DaemonProcess, after: dict[str, Any] | None = None) -> dict[str, Any]:
    """The daemon's last_reload once it differs from `after` (a SIGHUP reload is asynchronous)."""
    def done() -> dict[str, Any] | None:
        last = daemon.client.get("/v1/health").json()["config"]["last_reload"]
        return last if last and last != after else None

    return wait_until(done, timeout=10, what="the reload to finish")


# ---------------------------------------------------------------------------------------------
# A newcomer's first run: no config file, no root.


@pytest.fixture
def newcomer(shared_dir: Path, second_user: Callable[..., Any]) -> tuple[Path, list[str], dict[str, Any]]:
    """A home for an unprivileged user: (home dir, command prefix, Popen kwargs) to act as them.

    As root that user is uid 65534 (root's own defaults are /var/lib and /run, which a test must
    not touch); otherwise it is whoever runs the tests.
    """
    if DEFAULT_CONFIG_PATH.exists():
        pytest.skip(f"{DEFAULT_CONFIG_PATH} exists here, so `whatsappd run` would not use built-in defaults")
    home = shared_dir / "home"
    home.mkdir()
    if os.geteuid() == 0:
        prefix, popen = second_user()
        os.chown(home, 65534, 65534)
    else:
        prefix, popen = [], {}
    return home, prefix, popen


@pytest.mark.parametrize("xdg", [True, False], ids=["xdg-dirs", "home-only"])
def test_fresh_start_without_config_uses_per_user_defaults(
    newcomer: tuple[Path, list[str], dict[str, Any]], daemon_factory: Callable[..., DaemonProcess],
    tmp_path: Path, xdg: bool,
) -> None:
    """Not root, no config: XDG dirs are used, the socket is logged, and `whatsappctl health` answers."""
    home, prefix, popen = newcomer
    if xdg:
        env = {"XDG_STATE_HOME": str(home / "state"), "XDG_RUNTIME_DIR": str(home / "run")}
        state_dir, sock = home / "state" / "whatsappd", home / "run" / "whatsappd" / "control.sock"
    else:  # e.g. `su` without a login session: no XDG variables at all
        env = {}
        state_dir = home / ".local" / "state" / "whatsappd"
        sock = state_dir / "control.sock"
    daemon = daemon_factory(None, root=tmp_path / "proc", socket_path=sock, prefix=prefix,
                            program=whatsappd_command(), cwd=str(home), **popen)
    for name in ("XDG_STATE_HOME", "XDG_RUNTIME_DIR", "XDG_CONFIG_HOME"):
        daemon.env.pop(name, None)  # never the test runner's own
    daemon.env |= {"HOME": str(home), **env}
    daemon.start()

    # The socket answers while the daemon is still starting; the ready line comes once it has started.
    ready = wait_until(lambda: next((e for e in daemon.log_events() if e["event"] == "whatsappd ready"), None),
                       timeout=10, what="the ready line")
    assert ready["socket"] == str(sock)
    assert ready["state_dir"] == str(state_dir)
    assert ready["config"] == "built-in defaults"
    owner = os.geteuid() if not prefix and not popen else 65534
    assert state_dir.stat().st_uid == owner and stat.S_IMODE(state_dir.stat().st_mode) == 0o700
    assert sock.lstat().st_uid == owner and stat.S_IMODE(sock.lstat().st_mode) == 0o660

    result = run_ctl("health", env=daemon.env, prefix=prefix, cwd=str(home), **popen)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("whatsappd ") and ": ok, up " in result.stdout
    assert f"socket:    {sock}\n" in result.stdout
    assert "config:    built-in defaults\n" in result.stdout

    assert daemon.stop() == 0
    assert not sock.exists()


# ---------------------------------------------------------------------------------------------
# Stopping.


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_stop_signal_exits_0_within_budget_and_removes_socket(
    daemon_factory: Callable[..., DaemonProcess], sig: signal.Signals
) -> None:
    """SIGTERM/SIGINT: exit 0 well within daemon.shutdown_timeout, and the socket file is gone."""
    daemon = daemon_factory('[daemon]\nshutdown_timeout = "5s"\n' + TWO).start()
    started = time.monotonic()
    daemon.signal(sig)
    assert daemon.proc is not None and daemon.proc.wait(10) == 0
    assert time.monotonic() - started < 5
    assert not daemon.socket_path.exists()
    stopped = [e for e in daemon.log_events() if e["event"] == "stopped"]
    assert stopped and stopped[0]["exit_code"] == 0


def test_socket_is_not_removed_when_someone_else_replaced_it(daemon_factory: Callable[..., DaemonProcess]) -> None:
    """At shutdown the daemon removes only the socket file it created, not a newer one at that path."""
    daemon = daemon_factory("").start()
    daemon.socket_path.unlink()
    daemon.socket_path.write_text("someone else's")
    assert daemon.stop() == 0
    assert daemon.socket_path.read_text() == "someone else's"


# ---------------------------------------------------------------------------------------------
# The control socket file.


def test_stale_socket_file_is_replaced(daemon_factory: Callable[..., DaemonProcess]) -> None:
    """A socket file left by a killed daemon does not stop the next one from starting."""
    first = daemon_factory("").start()
    first.kill()  # SIGKILL: no cleanup, the socket file stays
    assert stat.S_ISSOCK(first.socket_path.lstat().st_mode)
    second = daemon_factory("", root=first.root).start()
    assert second.client.get("/v1/health").json()["pid"] == second.pid
    assert second.stop() == 0


def test_second_daemon_on_the_same_socket_refuses(daemon_factory: Callable[..., DaemonProcess], tmp_path: Path) -> None:
    """A second daemon on a socket a live daemon answers on exits 1 saying so; the first keeps serving."""
    first = daemon_factory(TWO).start()
    second = daemon_factory("", socket_path=first.socket_path)
    second.start(wait=False)
    assert second.proc is not None and second.proc.wait(15) == 1
    refusal = next(e for e in second.log_events() if e["level"] == "error")
    assert refusal["event"] == "cannot start: control socket unavailable"
    assert refusal["reason"] == (
        f"another whatsappd is already running and answering on {first.socket_path}; stop it first "
        "(systemctl stop whatsappd) or give this one another control.socket_path"
    )
    health = first.client.get("/v1/health").json()
    assert health["pid"] == first.pid and health["companies"]["total"] == 2
    assert first.stop() == 0


def test_second_daemon_on_the_same_state_dir_refuses_naming_the_first_pid(
        daemon_factory: Callable[..., DaemonProcess], tmp_path: Path) -> None:
    """A second daemon on a live daemon's state dir (its own socket) exits 1 naming the first's pid, opening nothing."""
    first = daemon_factory(TWO).start()
    second = daemon_factory(TWO, socket_path=tmp_path / "other" / "control.sock")
    assert second.config_path is not None
    second.config_path.write_text(second.config_path.read_text().replace(str(second.state_dir), str(first.state_dir)))
    before = sorted(p.name for p in first.state_dir.iterdir())
    second.start(wait=False)
    assert second.proc is not None and second.proc.wait(15) == 1
    refusal = next(e for e in second.log_events() if e["level"] == "error")
    assert refusal["event"] == "cannot start: another whatsappd uses this state directory"
    assert refusal["pid"] == first.pid and refusal["state_dir"] == str(first.state_dir)
    assert f"pid {first.pid}" in refusal["hint"]
    assert not second.socket_path.exists() and not second.socket_path.parent.exists()
    assert sorted(p.name for p in first.state_dir.iterdir()) == before
    health = first.client.get("/v1/health").json()
    assert health["pid"] == first.pid and health["companies"]["total"] == 2
    assert first.stop() == 0
    second.start()  # the lock died with the first daemon
    assert second.client.get("/v1/health").json()["pid"] == second.pid
    assert second.stop() == 0


def test_non_socket_file_at_socket_path_is_refused_and_kept(daemon_factory: Callable[..., DaemonProcess]) -> None:
    """A regular file where the socket should be: exit 1 with a clear reason, the file untouched."""
    daemon = daemon_factory("")
    daemon.socket_path.parent.mkdir(parents=True)
    daemon.socket_path.write_text("not a socket")
    daemon.start(wait=False)
    assert daemon.proc is not None and daemon.proc.wait(15) == 1
    assert daemon.socket_path.read_text() == "not a socket"
    assert "exists and is not a socket; refusing to replace it" in daemon.logs()


def test_socket_file_gets_configured_mode_and_group(daemon_factory: Callable[..., DaemonProcess]) -> None:
    """control.socket_mode and control.socket_group are what the socket file ends up with."""
    group = "daemon" if os.geteuid() == 0 else grp.getgrgid(os.getgid()).gr_name
    try:
        gid = grp.getgrnam(group).gr_gid
    except KeyError:
        pytest.skip(f"no group {group!r} here")
    daemon = daemon_factory(f'[control]\nsocket_mode = "0600"\nsocket_group = "{group}"\n').start()
    st = daemon.socket_path.lstat()
    assert stat.S_IMODE(st.st_mode) == 0o600 and st.st_gid == gid
    assert daemon.stop() == 0


def test_unusable_state_dir_exits_1_with_a_reason(daemon_factory: Callable[..., DaemonProcess], tmp_path: Path) -> None:
    """A state dir that cannot be created: exit 1 naming it, and no socket is left behind."""
    (tmp_path / "file").write_text("")
    daemon = daemon_factory(f'[daemon]\nstate_dir = "{tmp_path}/file/state"\n')
    daemon.start(wait=False)
    assert daemon.proc is not None and daemon.proc.wait(15) == 1
    error = next(e for e in daemon.log_events() if e["level"] == "error")
    assert error["event"] == "cannot create the state directory"
    assert error["path"] == f"{tmp_path}/file/state"
    assert not daemon.socket_path.exists()


# ---------------------------------------------------------------------------------------------
# Reload.


def test_sighup_with_broken_file_keeps_the_old_config(daemon_factory: Callable[..., DaemonProcess]) -> None:
    """SIGHUP on a bad file: old companies still served, health shows the failure, /v1/reload answers 422."""
    daemon = daemon_factory(TWO).start()
    assert daemon.config_path is not None
    daemon.config_path.write_text(daemon.config_path.read_text() + "[[companies]]\nid = \"Bad Id\"\n")
    daemon.signal(signal.SIGHUP)
    last = _wait_reload(daemon)
    assert last["ok"] is False and last["source"] == str(daemon.config_path)
    assert any("companies[2].id = 'Bad Id'" in p for p in last["problems"])
    assert _ids(daemon) == ["acme", "beta"]

    response = daemon.client.post("/v1/reload")
    assert response.status == 422
    error = response.json()["error"]
    assert error["code"] == "config_invalid"
    assert "the previous configuration stays in force" in error["message"]
    assert error["source"] == str(daemon.config_path)
    assert any("is not a valid company id" in p for p in error["problems"])
    assert any(e["event"] == "reload failed; the previous configuration stays in force"
               for e in daemon.log_events())
    assert _ids(daemon) == ["acme", "beta"]
    assert daemon.stop() == 0


def test_sighup_with_syntax_error_keeps_serving(daemon_factory: Callable[..., DaemonProcess]) -> None:
    """Even a file that is not TOML at all leaves the daemon up with its old config."""
    daemon = daemon_factory(TWO).start()
    assert daemon.config_path is not None
    daemon.config_path.write_text("[[companies]\n")
    daemon.signal(signal.SIGHUP)
    last = _wait_reload(daemon)
    assert last["ok"] is False and "TOML syntax error" in last["problems"][0]
    assert _ids(daemon) == ["acme", "beta"]
    assert daemon.stop() == 0


def test_sighup_applies_added_and_removed_companies(daemon_factory: Callable[..., DaemonProcess]) -> None:
    """SIGHUP with a valid changed file: new companies appear, dropped ones go, the diff is reported."""
    daemon = daemon_factory(TWO).start()
    assert daemon.config_path is not None
    text = daemon.config_path.read_text().replace('id = "beta"', 'id = "gamma"')
    daemon.config_path.write_text(text + '[[companies]]\nid = "delta"\nengine = "simulator"\n')
    daemon.signal(signal.SIGHUP)
    last = _wait_reload(daemon)
    assert last["ok"] is True
    assert (last["added"], last["removed"], last["changed"]) == (["delta", "gamma"], ["beta"], [])
    assert _ids(daemon) == ["acme", "delta", "gamma"]
    events = daemon.log_events()
    assert any(e["event"] == "company added by reload" and e["company"] == "gamma" for e in events)
    assert any(e["event"] == "company removed by reload" and e["company"] == "beta" for e in events)

    # The next reload of the same file changes nothing.
    second = daemon.client.post("/v1/reload").json()
    assert second["added"] == second["removed"] == second["changed"] == second["settings"] == []
    assert daemon.stop() == 0


def test_reload_of_restart_only_settings_keeps_the_running_values(
    daemon_factory: Callable[..., DaemonProcess], tmp_path: Path
) -> None:
    """Changed socket_path/body limit: reported restart_required, not applied, the new path never created."""
    daemon = daemon_factory('[control]\nmax_body_size = "1KiB"\n[logging]\nlevel = "info"\n').start()
    assert daemon.config_path is not None
    new_sock = tmp_path / "new" / "control.sock"
    text = daemon.config_path.read_text().replace(str(daemon.socket_path), str(new_sock))
    text = text.replace('max_body_size = "1KiB"', 'max_body_size = "1MiB"').replace('"info"', '"debug"')
    daemon.config_path.write_text(text)

    result = daemon.client.post("/v1/reload").json()
    assert result["ok"] is True
    assert result["restart_required"] == ["control.socket_path", "control.max_body_size"]
    assert result["settings"] == ["logging.level"]
    assert not new_sock.exists() and not new_sock.parent.exists()
    assert daemon.client.get("/v1/health").json()["socket"] == str(daemon.socket_path)
    assert daemon.client.post("/v1/reload", body=b"{}" + b" " * 2000).status == 413
    warning = next(e for e in daemon.log_events() if e["event"] == "some changed settings apply only after a restart")
    assert warning["settings"] == ["control.socket_path", "control.max_body_size"]

    # logging.level was applied: debug request lines appear from now on.
    daemon.client.get("/v1/health")
    wait_until(lambda: any(e["event"] == "request" for e in daemon.log_events()), timeout=5,
               what="a debug request line")
    assert daemon.stop() == 0
    assert not daemon.socket_path.exists()


def test_reload_without_config_file_uses_builtin_defaults_again(
    newcomer: tuple[Path, list[str], dict[str, Any]], daemon_factory: Callable[..., DaemonProcess], tmp_path: Path
) -> None:
    """A daemon started without a config file reloads the same way: built-in defaults, no change."""
    home, prefix, popen = newcomer
    sock = home / "run" / "whatsappd" / "control.sock"
    daemon = daemon_factory(None, root=tmp_path / "proc", socket_path=sock, prefix=prefix, cwd=str(home), **popen)
    for name in ("XDG_STATE_HOME", "XDG_RUNTIME_DIR", "XDG_CONFIG_HOME"):
        daemon.env.pop(name, None)
    daemon.env |= {"HOME": str(home), "XDG_STATE_HOME": str(home / "state"), "XDG_RUNTIME_DIR": str(home / "run")}
    daemon.start()
    result = daemon.client.post("/v1/reload").json()
    assert result["ok"] is True and result["source"] == "built-in defaults"
    assert result["added"] == result["removed"] == result["settings"] == result["restart_required"] == []
    assert daemon.stop() == 0
