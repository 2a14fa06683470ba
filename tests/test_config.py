"""whatsappd.config and the config-facing commands: messages, exit 78, defaults, rendering, diff."""

from __future__ import annotations

import dataclasses
import subprocess
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from whatsappd.config import (
    DEFAULT_CONFIG_PATH,
    SETTINGS,
    CompanyConfig,
    Config,
    ConfigError,
    build_config,
    default_paths,
    diff_configs,
    example_file,
    format_duration,
    format_size,
    load_config,
    parse_duration,
    parse_size,
    render_config,
)
from whatsappd.testing.daemon import clean_env, whatsappd_command

REPO = Path(__file__).resolve().parent.parent

# ---------------------------------------------------------------------------------------------
# One case per kind of error: (file text, fragments the message must contain). `{head}` is two
# lines of dotted keys naming a state dir and a socket that must never be created.

ERROR_KINDS: dict[str, tuple[str, list[str]]] = {
    "unknown section": (
        "{head}[bogus]\nx = 1\n",
        ["bogus: unknown section or key", "allowed: [cluster], [control], [daemon]", "[[companies]]"],
    ),
    "unknown key": (
        '{head}control.sokcet_mode = "0600"\n',
        ["control.sokcet_mode: unknown key", "allowed in [control]:", "socket_mode"],
    ),
    "wrong type": (
        '{head}control.max_connections = "many"\n',
        ['control.max_connections = "many"', "expected a whole number from 1 to 10000"],
    ),
    "section not a table": (
        "{head}logging = 5\n",
        ["logging: expected a table, written [logging]"],
    ),
    "bad duration": (
        '{head}daemon.shutdown_timeout = "20 parsecs"\n',
        ['daemon.shutdown_timeout = "20 parsecs"', 'expected a duration such as "30s"', "ms, s, m, h, d"],
    ),
    "duration without unit": (
        "{head}daemon.shutdown_timeout = 20\n",
        ["daemon.shutdown_timeout = 20", 'expected a duration string such as "30s"'],
    ),
    "out of range": (
        "{head}control.max_connections = 0\n",
        ["control.max_connections = 0", "expected a whole number from 1 to 10000"],
    ),
    "duration out of range": (
        '{head}daemon.shutdown_timeout = "1h"\n',
        ['daemon.shutdown_timeout = "1h"', "expected a duration from 1s to 10m"],
    ),
    "size out of range": (
        '{head}control.max_body_size = "10"\n',
        ['control.max_body_size = "10"', "expected a size from 1KiB to 1GiB"],
    ),
    "bad socket mode": (
        '{head}control.socket_mode = "0777"\n',
        ['control.socket_mode = "0777"', "no execute bits"],
    ),
    "unknown group": (
        '{head}control.socket_group = "no-such-group-whatsappd"\n',
        ['control.socket_group = "no-such-group-whatsappd"', "no such group on this system"],
    ),
    "bad choice": (
        '{head}logging.level = "verbose"\n',
        ['logging.level = "verbose"', "expected one of 'debug', 'info', 'warning', 'error'"],
    ),
    "bad company id": (
        '{head}[[companies]]\nid = "ACME Corp"\n',
        ["companies[0].id = 'ACME Corp'", "is not a valid company id", "a-z, 0-9"],
    ),
    "missing company id": (
        '{head}[[companies]]\nname = "ACME"\n',
        ["companies[0]: missing required key 'id'"],
    ),
    "unknown company key": (
        '{head}[[companies]]\nid = "acme"\nphone = "+5511"\n',
        ["companies[0].phone: unknown key", "allowed: id, name, engine, proxy"],
    ),
    "duplicate id": (
        '{head}[[companies]]\nid = "acme"\n[[companies]]\nid = "acme"\n',
        ["companies[1] (id 'acme'): duplicate company id", "each id may appear once"],
    ),
    "bad engine": (
        '{head}[[companies]]\nid = "acme"\nengine = "baileys"\n',
        ["companies[0] (id 'acme').engine = 'baileys'", "expected one of 'neonize', 'simulator'"],
    ),
    "bad proxy": (
        '{head}[[companies]]\nid = "acme"\nproxy = "ftp://proxy.example"\n',
        ["companies[0] (id 'acme').proxy = 'ftp://proxy.example'", 'such as "socks5://127.0.0.1:1080"'],
    ),
    "control character in a name": (
        '{head}[[companies]]\nid = "acme"\nname = "ACME\\u001b]0;pwned\\u0007"\n',
        ["companies[0] (id 'acme').name = 'ACME\\x1b]0;pwned\\x07'", "character 5 is U+001B, a control "
         "or formatting character; a name may not contain those"],
    ),
    "syntax error": (
        "{head}control.max_connections = \n",
        ["TOML syntax error", "line 3"],
    ),
}


def _head(root: Path) -> str:
    return f'daemon.state_dir = "{root}/state"\ncontrol.socket_path = "{root}/run/control.sock"\n'


def _write_kind(kind: str, root: Path) -> tuple[Path, list[str]]:
    """Write the config file of one error kind under root; return its path and expected fragments."""
    path = root / "whatsappd.toml"
    if kind == "missing file":
        return root / "nope.toml", ["the file does not exist", "pass --config with the right path"]
    if kind == "directory":
        path = root / "conf.d"
        path.mkdir()
        return path, ["this is a directory, not a config file"]
    if kind == "not UTF-8":
        path.write_bytes(_head(root).encode() + b"# caf\xe9 in Latin-1\n")
        return path, ["the file is not UTF-8 text (byte"]
    text, fragments = ERROR_KINDS[kind]
    path.write_text(text.format(head=_head(root)))
    return path, fragments


ALL_KINDS = [*ERROR_KINDS, "missing file", "directory", "not UTF-8"]


@pytest.mark.parametrize("kind", ALL_KINDS)
def test_each_error_kind_has_its_own_message(kind: str, tmp_path: Path) -> None:
    """Every kind of config error names the file, the key (or line), the bad value and what is allowed."""
    path, fragments = _write_kind(kind, tmp_path)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert info.value.source == str(path)
    assert message.startswith(f"invalid configuration in {path}:\n  - ")
    for fragment in fragments:
        assert fragment in message
    assert len(info.value.problems) == 1, info.value.problems


def test_error_messages_differ_between_kinds(tmp_path: Path) -> None:
    """No two kinds of error share a message: each says what is wrong in its own words."""
    problems = {}
    for index, kind in enumerate(ALL_KINDS):
        root = tmp_path / str(index)
        root.mkdir()
        path, _ = _write_kind(kind, root)
        with pytest.raises(ConfigError) as info:
            load_config(path)
        problems[kind] = info.value.problems[0].replace(str(root), "ROOT")
    assert len(set(problems.values())) == len(problems), problems


def test_every_problem_is_reported_at_once(tmp_path: Path) -> None:
    """Validation collects all problems before failing, so one edit round fixes the file."""
    path = tmp_path / "c.toml"
    path.write_text('[control]\nmax_connections = 0\nbogus = 1\n[logging]\nlevel = "loud"\n'
                    '[[companies]]\nid = "Bad Id"\n')
    with pytest.raises(ConfigError) as info:
        load_config(path)
    problems = "\n".join(info.value.problems)
    assert len(info.value.problems) == 4
    for key in ("control.max_connections", "control.bogus", "logging.level", "companies[0].id"):
        assert key in problems


def test_cross_field_checks(tmp_path: Path) -> None:
    """max_delay below initial_delay, and a heartbeat timeout of at most two intervals, are refused."""
    path = tmp_path / "c.toml"
    path.write_text('[reconnect]\ninitial_delay = "10s"\nmax_delay = "5s"\n'
                    '[workers]\nheartbeat_interval = "5s"\nheartbeat_timeout = "10s"\n')
    with pytest.raises(ConfigError) as info:
        load_config(path)
    problems = "\n".join(info.value.problems)
    assert 'reconnect.max_delay = "5s": must not be shorter than reconnect.initial_delay (10s)' in problems
    assert "workers.heartbeat_timeout: must be more than twice workers.heartbeat_interval" in problems


@pytest.mark.parametrize("name", [
    "ACME\x1b[2J", "ACME\x9b31m", "ACME\x07", "ACME\x7f", "ACME\nforged line", "ACME\rX", "ACME\tSP",
    "ACME \u202eevil", "ACME \u2066x\u2069", "ACME\u200b", "ACME\u2028X", "\ufeffACME", "ACME\U000e0041",
])
def test_company_names_refuse_control_and_format_characters(name: str) -> None:
    """A name with a C0/C1 control, DEL, a bidi or zero-width format character or a line separator is refused."""
    with pytest.raises(ConfigError, match="a control or formatting character; a name may not contain those") as info:
        build_config({"companies": [{"id": "a", "name": name}]}, "test")
    assert info.value.problems[0].startswith(f"companies[0] (id 'a').name = {name!r}: character ")


@pytest.mark.parametrize("name", [
    "ACME Imóveis", "Imobiliária São João", "\U0001f468\u200d\U0001f469\u200d\U0001f467 Família",
    "\u0645\u06cc\u200c\u062e\u0648\u0627\u0647\u0645", "東京不動産", "A \\ B \"quoted\"",
])
def test_company_names_in_any_script_are_accepted(name: str) -> None:
    """Accents, CJK, emoji sequences and Persian (zero-width joiners included) are ordinary names."""
    config = build_config({"companies": [{"id": "a", "name": name}]}, "test")
    assert config.companies[0].name == name


def test_default_country_is_an_iso_code_or_empty() -> None:
    """outbox.default_country takes a known ISO country code (any case) or "" (none, the default)."""
    assert build_config({}, "test").outbox_default_country == ""
    assert build_config({"outbox": {"default_country": "br"}}, "test").outbox_default_country == "BR"
    for bad in ("XX", "Brazil", 55):
        with pytest.raises(ConfigError, match=r'outbox.default_country = .*: expected an ISO country code such as "BR"'):
            build_config({"outbox": {"default_country": bad}}, "test")


def test_relative_paths_are_refused(tmp_path: Path) -> None:
    """state_dir and socket_path must be absolute (the daemon changes directory when detached)."""
    path = tmp_path / "c.toml"
    path.write_text('[daemon]\nstate_dir = "state"\n')
    with pytest.raises(ConfigError, match=r'daemon.state_dir = "state": expected an absolute path'):
        load_config(path)


def test_import_baileys_root_is_off_by_default_and_an_absolute_path_outside_the_state_dir() -> None:
    """import.baileys_root: "" is off (None); a relative path, a non-string or a path inside state_dir is refused."""
    assert build_config({}, "test").import_baileys_root is None
    on = build_config({"import": {"baileys_root": "/srv/crm/sessions"}}, "test")
    assert on.import_baileys_root == Path("/srv/crm/sessions")
    for bad, why in (("sessions", "expected an absolute path"), (7, "expected a non-empty path string"),
                     ("/var/lib/w/sessions", "must not lie inside daemon.state_dir")):
        with pytest.raises(ConfigError, match=f"import.baileys_root = .*: {why}"):
            build_config({"daemon": {"state_dir": "/var/lib/w"}, "import": {"baileys_root": bad}}, "test")


@pytest.mark.root
def test_unreadable_file_says_permission_denied(shared_dir: Path, second_user: Callable[..., Any]) -> None:
    """A config the daemon's user cannot read: exit 78 naming the uid and what to check."""
    path = shared_dir / "secret.toml"
    path.write_text("")
    path.chmod(0o600)
    prefix, popen = second_user()
    result = subprocess.run([*prefix, *whatsappd_command(), "check-config", "--config", str(path)],
                            env=clean_env(), capture_output=True, text=True, timeout=30, cwd="/", **popen)
    assert result.returncode == 78, result.stderr
    assert f"invalid configuration in {path}" in result.stderr
    assert "permission denied reading the file as uid 65534; check its owner and mode" in result.stderr


# ---------------------------------------------------------------------------------------------
# The commands: exit 78, one message, nothing written.


@pytest.mark.parametrize("command", ["run", "check-config"])
@pytest.mark.parametrize("kind", ALL_KINDS)
def test_bad_config_exits_78_and_writes_nothing(command: str, kind: str, tmp_path: Path) -> None:
    """`whatsappd run|check-config --config BAD`: exit 78, one message on stderr, no file created."""
    root = tmp_path / "root"
    root.mkdir()
    path, fragments = _write_kind(kind, root)
    before = sorted(p.name for p in root.iterdir())
    result = subprocess.run([*whatsappd_command(), command, "--config", str(path)],
                            env=clean_env(), capture_output=True, text=True, timeout=30,
                            stdin=subprocess.DEVNULL)
    assert result.returncode == 78, result
    assert result.stdout == ""
    assert result.stderr.startswith(f"whatsappd: invalid configuration in {path}:\n")
    assert result.stderr.count("whatsappd:") == 1 and "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in result.stderr
    assert sorted(p.name for p in root.iterdir()) == before  # no state dir, no socket dir


def test_check_config_prints_the_effective_config_as_toml(tmp_path: Path) -> None:
    """check-config prints every setting, defaults filled in, as TOML that loads to the same config."""
    path = tmp_path / "c.toml"
    path.write_text(
        f'[daemon]\nstate_dir = "{tmp_path}/state"\n[control]\nsocket_path = "{tmp_path}/c.sock"\n'
        'max_body_size = "1KiB"\nallowed_uids = [0, 1001]\n[reconnect]\ninitial_delay = "1.5s"\n'
        'max_delay = "90500ms"\n'
        '[[companies]]\nid = "acme"\nname = "ACME \\"Imóveis\\" SP\\\\"\nengine = "simulator"\n'
        '[[companies]]\nid = "beta"\nproxy = "socks5://127.0.0.1:1080"\n'
    )
    result = subprocess.run([*whatsappd_command(), "check-config", "--config", str(path)],
                            env=clean_env(), capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    assert result.stderr.strip() == f"# configuration OK ({path}); 2 companies"
    printed = tomllib.loads(result.stdout)
    for setting in SETTINGS:
        assert setting.key in printed[setting.section], setting.dotted
    assert printed["control"]["idle_timeout"] == "1m"  # a default, filled in
    reparsed = build_config(printed, "printed")
    assert dataclasses.replace(reparsed, source="x") == dataclasses.replace(load_config(path), source="x")


def test_render_config_round_trips_every_value(tmp_path: Path) -> None:
    """render_config's TOML loads back to an equal Config, odd durations and names included."""
    data = {
        "daemon": {"state_dir": "/srv/w state", "shutdown_timeout": "1m30s"},
        "control": {"socket_path": "/run/w/c.sock", "socket_mode": "0600", "max_body_size": 1025,
                    "idle_timeout": "2.5s", "allowed_uids": [0, 7]},
        "reconnect": {"initial_delay": "250ms", "max_delay": "1h0m1s", "multiplier": 1.5,
                      "connect_rate": 0.25},
        "workers": {"heartbeat_interval": "0.1s", "stop_grace": "1.25s"},
        "companies": [{"id": "a", "name": 'a "quoted" back\\slash, ünïcode', "engine": "simulator"},
                      {"id": "b-2_x", "proxy": "http://127.0.0.1:3128"}],
    }
    config = build_config(data, "test")
    again = build_config(tomllib.loads(render_config(config)), "test")
    assert again == config


# ---------------------------------------------------------------------------------------------
# The documented example file.


def test_etc_example_is_generated_from_the_settings_table() -> None:
    """etc/whatsappd.toml is exactly example_file(), so it documents every key and its default."""
    assert (REPO / "etc" / "whatsappd.toml").read_text(encoding="utf-8") == example_file()


def test_example_file_parses_to_the_defaults() -> None:
    """The example loads as is; with every line uncommented it still gives the built-in defaults."""
    text = example_file()
    defaults = build_config({}, "x", env={}, uid=0)
    assert build_config(tomllib.loads(text), "x", env={}, uid=0) == defaults
    uncommented = "\n".join(line[1:] if line.startswith("#") and not line.startswith("# ") else line
                            for line in text.splitlines())
    config = build_config(tomllib.loads(uncommented), "x", env={}, uid=0)
    assert dataclasses.replace(config, companies=(), webhooks=()) == defaults
    assert config.companies == (CompanyConfig(id="acme", name="ACME Imóveis", engine="neonize"),)
    assert [w.id for w in config.webhooks] == ["crm"]  # the [[webhooks]] example is valid too


def test_example_file_documents_every_setting() -> None:
    """Every setting appears in its own section, its help text in the comment just above it."""
    lines = example_file().splitlines()
    for setting in SETTINGS:
        section_at = lines.index(f"[{setting.section}]")
        key_at = next(i for i, line in enumerate(lines) if i > section_at and line.startswith(f"#{setting.key} = "))
        assert not any(line.startswith("[") for line in lines[section_at + 1:key_at]), setting.dotted
        comment = []
        for line in reversed(lines[:key_at]):
            if not line.startswith("# "):
                break
            comment.insert(0, line[2:])
        assert " ".join(comment) == " ".join(setting.help.split()), setting.dotted


# ---------------------------------------------------------------------------------------------
# Defaults: system paths for root, XDG paths for a user, systemd's directories first.


@pytest.mark.parametrize(
    ("env", "uid", "state", "sock"),
    [
        ({}, 0, "/var/lib/whatsappd", "/run/whatsappd/control.sock"),
        ({"HOME": "/root", "XDG_STATE_HOME": "/x/state", "XDG_RUNTIME_DIR": "/x/run"}, 0,
         "/var/lib/whatsappd", "/run/whatsappd/control.sock"),
        ({"HOME": "/home/ana", "XDG_STATE_HOME": "/home/ana/st", "XDG_RUNTIME_DIR": "/run/user/1000"}, 1000,
         "/home/ana/st/whatsappd", "/run/user/1000/whatsappd/control.sock"),
        ({"HOME": "/home/ana", "XDG_RUNTIME_DIR": "/run/user/1000"}, 1000,
         "/home/ana/.local/state/whatsappd", "/run/user/1000/whatsappd/control.sock"),
        ({"HOME": "/home/ana"}, 1000,
         "/home/ana/.local/state/whatsappd", "/home/ana/.local/state/whatsappd/control.sock"),
        ({"STATE_DIRECTORY": "/var/lib/whatsappd:/var/lib/other", "RUNTIME_DIRECTORY": "/run/whatsappd"}, 990,
         "/var/lib/whatsappd", "/run/whatsappd/control.sock"),
        ({"STATE_DIRECTORY": "/srv/state", "RUNTIME_DIRECTORY": "/srv/run", "XDG_RUNTIME_DIR": "/x"}, 0,
         "/srv/state", "/srv/run/control.sock"),
    ],
    ids=["root", "root-ignores-xdg", "user-xdg", "user-xdg-runtime-only", "user-no-xdg",
         "systemd-dirs", "systemd-dirs-win-for-root"],
)
def test_default_paths(env: dict[str, str], uid: int, state: str, sock: str) -> None:
    """state_dir/socket_path defaults: systemd's dirs, then root's system paths, then XDG per-user."""
    assert default_paths(env, uid) == (Path(state), Path(sock))


def test_no_config_file_gives_per_user_defaults() -> None:
    """Without a config file a non-root user gets XDG paths and every other built-in default."""
    if DEFAULT_CONFIG_PATH.exists():
        pytest.skip(f"{DEFAULT_CONFIG_PATH} exists on this machine")
    env = {"HOME": "/home/ana", "XDG_STATE_HOME": "/home/ana/st", "XDG_RUNTIME_DIR": "/run/user/1000"}
    config = load_config(None, env=env, uid=1000)
    assert config.source == "built-in defaults"
    assert config.daemon_state_dir == Path("/home/ana/st/whatsappd")
    assert config.control_socket_path == Path("/run/user/1000/whatsappd/control.sock")
    assert config.sessions_dir == Path("/home/ana/st/whatsappd/sessions")
    assert config.control_socket_mode == 0o660 and config.daemon_shutdown_timeout == 20
    assert config.companies == ()


def test_config_is_frozen() -> None:
    """The loaded configuration cannot be changed in place (a reload builds a new one)."""
    config = build_config({}, "x", env={}, uid=0)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.control_max_connections = 1  # type: ignore[misc]


# ---------------------------------------------------------------------------------------------
# Durations and sizes.


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("30s", 30), ("5m", 300), ("1h30m", 5400), ("250ms", 0.25), ("1.5s", 1.5), ("1d", 86400),
     (" 2h ", 7200), ("1m30s500ms", 90.5), ("0s", 0)],
)
def test_parse_duration(text: str, seconds: float) -> None:
    """Durations are numbers with units, summed: "1h30m" is 5400 seconds."""
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("value", [30, 1.5, True, None, "", "30", "5 m", "5x", "m5", "-5s", "5s trailing", "1h 30m"])
def test_parse_duration_refuses(value: object) -> None:
    """A bare number, an unknown unit or stray text is not a duration."""
    with pytest.raises(ValueError, match="duration"):
        parse_duration(value)


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(0, "0s"), (0.25, "250ms"), (30, "30s"), (300, "5m"), (5400, "1h30m"), (86401, "1d1s"),
     (1.5, "1s500ms"), (90.5, "1m30s500ms")],
)
def test_format_duration_is_exact_and_parses_back(seconds: float, text: str) -> None:
    """format_duration writes the shortest exact form, and parse_duration reads it back unchanged."""
    assert format_duration(seconds) == text
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize(
    ("value", "size"),
    [("1MiB", 1024**2), ("512KiB", 512 * 1024), ("16MiB", 16 * 1024**2), ("1KB", 1000), ("2GiB", 2 * 1024**3),
     (1048576, 1048576), ("4096", 4096), ("1 MiB", 1024**2), ("3k", 3072)],
)
def test_parse_size(value: object, size: int) -> None:
    """Sizes are bytes, or numbers with binary (KiB) or decimal (KB) units."""
    assert parse_size(value) == size


@pytest.mark.parametrize("value", [-1, True, 1.5, "1.5MiB", "lots", "1 TiB", ""])
def test_parse_size_refuses(value: object) -> None:
    """Fractions, negative numbers and unknown units are not sizes."""
    with pytest.raises(ValueError):
        parse_size(value)


def test_format_size() -> None:
    """Sizes render in the largest exact binary unit, else in bytes."""
    assert [format_size(n) for n in (1024, 16 * 1024**2, 1000, 1024**3)] == ["1KiB", "16MiB", "1000", "1GiB"]


# ---------------------------------------------------------------------------------------------
# The diff a reload applies.


def _config(companies: tuple[CompanyConfig, ...] = (), **values: object) -> Config:
    return dataclasses.replace(build_config({}, "x", env={}, uid=0), companies=companies, **values)


def test_diff_of_equal_configs_is_empty() -> None:
    """Reloading an unchanged file changes nothing."""
    config = _config((CompanyConfig("acme"),))
    diff = diff_configs(config, dataclasses.replace(config, source="other"))
    assert diff.empty
    assert diff.as_dict() == {"added": [], "removed": [], "changed": [], "settings": [], "restart_required": []}


def test_diff_names_added_removed_and_changed_companies() -> None:
    """Companies are compared by id: new ids are added, missing ones removed, edited ones changed."""
    old = _config((CompanyConfig("acme"), CompanyConfig("beta"), CompanyConfig("gone")))
    new = _config((CompanyConfig("acme"), CompanyConfig("beta", engine="simulator"), CompanyConfig("zeta"),
                   CompanyConfig("new")))
    diff = diff_configs(old, new)
    assert (diff.added, diff.removed, diff.changed) == (("new", "zeta"), ("gone",), ("beta",))
    assert not diff.settings and not diff.restart_required and not diff.empty


def test_diff_separates_reloadable_settings_from_restart_only_ones() -> None:
    """Changed settings are listed by dotted key; the socket, its limits and the state dir need a restart."""
    old = _config()
    new = _config(control_socket_path=Path("/elsewhere.sock"), daemon_state_dir=Path("/srv"),
                  control_socket_mode=0o600, control_socket_group="adm", control_max_connections=3,
                  control_max_body_size=2048, control_idle_timeout=5.0,
                  logging_level="debug", reconnect_max_delay=600.0, control_allowed_uids=(1001,))
    diff = diff_configs(old, new)
    assert set(diff.restart_required) == {
        "control.socket_path", "daemon.state_dir", "control.socket_mode", "control.socket_group",
        "control.max_connections", "control.max_body_size", "control.idle_timeout",
    }
    assert set(diff.settings) == {"logging.level", "reconnect.max_delay", "control.allowed_uids"}
    assert not diff.added and not diff.removed and not diff.changed
