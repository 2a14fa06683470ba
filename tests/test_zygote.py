"""Workers forked by a zygote (`[workers] launcher = "zygote"`, the default): what the supervisor
relies on still holds, and a zygote that dies or hangs takes no worker with it.

Real daemons, real zygote and worker processes, real signals; process facts come from /proc.
The supervision and fault tests of test_supervisor.py and test_isolation.py run with both
launchers; these pin what is particular to the zygote.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from whatsappd import pidlock
from whatsappd.testing.daemon import NotifySocket, wait_until
from whatsappd.testing.scenario import SimDaemon, process_gone, process_state, sim_config
from whatsappd.testing.socks5 import Socks5FaultProxy


def stat_fields(pid: int) -> list[str]:
    """/proc/PID/stat after the command name: state, ppid, pgrp, session, ..."""
    return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()


def cmdline(pid: int) -> str:
    return Path(f"/proc/{pid}/cmdline").read_text().replace("\0", " ")


def children(pid: int) -> dict[int, str]:
    """The processes whose parent is pid: {pid: state letter}."""
    out = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = stat_fields(int(entry.name))
            except (FileNotFoundError, ProcessLookupError):
                continue
            if int(fields[1]) == pid:
                out[int(entry.name)] = fields[0]
    return out


def zygote_of(daemon: SimDaemon, engine: str = "simulator") -> int:
    """The pid of the daemon's live zygote for this engine (the last one it said it started)."""
    def find() -> int | None:
        started = [e["pid"] for e in daemon.log_lines("zygote started", engine=engine)]
        return started[-1] if started and not process_gone(started[-1]) else None

    pid: int = wait_until(find, 10, what=f"a {engine} zygote")
    assert "whatsappd.worker.zygote" in cmdline(pid) and int(stat_fields(pid)[1]) == daemon.pid
    return pid


def merge_any(pid: int) -> str | None:
    """`ksm_merge_any` of /proc/PID/ksm_stat ("yes": PR_SET_MEMORY_MERGE), None where there is none."""
    try:
        lines = Path(f"/proc/{pid}/ksm_stat").read_text().splitlines()
    except FileNotFoundError:
        return None
    return next((line.split(":")[1].strip() for line in lines if line.startswith("ksm_merge_any:")), None)


def fds(pid: int) -> list[str]:
    base = Path(f"/proc/{pid}/fd")
    return sorted(os.readlink(base / name) for name in os.listdir(base))


def test_a_zygote_worker_is_the_daemons_child_in_its_own_session_with_a_scrubbed_environment(daemons, tmp_path):
    """A zygote's worker: parent = the daemon, own session, no systemd variables, its lock, company= logs."""
    notify = NotifySocket(tmp_path / "notify.sock")
    try:
        d = daemons(sim_config("acme"), notify=notify)
        d.start()
        pid = d.pair("acme")["worker"]["pid"]
    finally:
        notify.close()
    state, ppid, pgrp, session = stat_fields(pid)[:4]
    zygote = zygote_of(d)
    assert "whatsappd.worker.zygote" in cmdline(pid)  # forked, never exec'd
    assert int(ppid) == d.pid  # reparented: the daemon reaps it and reads its exact exit status
    assert int(pgrp) == int(session) == pid  # a Ctrl-C on the daemon's terminal is not its business
    environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    assert not [v for v in environ if v.startswith((b"NOTIFY_SOCKET=", b"LISTEN_", b"WATCHDOG_"))]
    assert d.session_dir("acme").joinpath("whatsappd.lock").read_text().strip() == str(pid)
    assert not [f for f in fds(pid) if f.startswith("socket:") and f in fds(zygote)]  # no zygote channel
    # the session lock refuses a forked worker too, which logs with its company like an exec'd one
    d.stop()
    holder = pidlock.acquire(d.session_dir("acme") / "whatsappd.lock")  # a leftover client, say
    try:
        mark = d.log_mark()
        d.start()
        d.wait_state("acme", "failed", timeout=10)
        locked = d.log_lines("session is locked by another process; not starting a second client on it", mark)
        assert [e["company"] for e in locked] == ["acme"]
        assert d.log_lines("worker exited", mark, company="acme", exit_code=17)
    finally:
        os.close(holder)


@pytest.mark.parametrize("launcher", ["zygote", "exec"])
def test_workers_and_zygotes_ask_for_kernel_same_page_merging(daemons, launcher):
    """Every worker, forked or exec'd, and every zygote asked for KSM merging of all its memory."""
    if merge_any(os.getpid()) is None:
        pytest.skip("this kernel shows no ksm_merge_any in /proc/PID/ksm_stat (PR_SET_MEMORY_MERGE: Linux 6.4+)")
    d = daemons(sim_config("acme", workers={"launcher": launcher}))
    d.start()
    worker = d.pair("acme")["worker"]["pid"]
    for pid in (worker, *([zygote_of(d)] if launcher == "zygote" else [])):
        assert merge_any(pid) == "yes", cmdline(pid)
    assert merge_any(d.pid) == "no"  # the daemon itself is not offered
    assert d.stop() == 0


def test_the_zygote_holds_no_thread_and_no_file_but_its_channel(daemons):
    """The zygote: one thread, no Go library mapped, only stdio and its control channel open."""
    proxy = Socks5FaultProxy(mode="refuse")
    with proxy:
        d = daemons(sim_config("acme") + f'[[companies]]\nid = "neo"\nengine = "neonize"\nproxy = "{proxy.url}"\n')
        d.start()
        d.pair("acme")
        assert d.post("neo", "connect").status == 202
        assert proxy.wait_for_requests(1, timeout=30)
        for engine in ("simulator", "neonize"):
            zygote = zygote_of(d, engine)
            assert os.listdir(f"/proc/{zygote}/task") == [str(zygote)]
            assert "neonize-" not in Path(f"/proc/{zygote}/maps").read_text()
            opened = [f for f in fds(zygote) if not f.startswith(("/dev/null", str(d.log_path)))]
            assert len(opened) == 1 and opened[0].startswith("socket:"), opened
        assert proxy.requests[0] == ("web.whatsapp.com", 443)
        d.wait_state("neo", "reconnecting", check=lambda s: s["last_error"]
                     and s["last_error"]["code"] == "connection_failed")
        assert d.log_lines("connect_failed", company="neo")
        assert not d.log_lines("the zygote did not start this worker; exec'ing it")  # both were forked
        assert d.stop() == 0


def test_kill_9_of_the_zygote_leaves_running_workers_connected_and_the_next_start_works(daemons):
    """kill -9 of the zygote: workers stay connected with the same pids; a new zygote forks the next."""
    d = daemons(sim_config("acme", "bob", "carol", reconnect={"initial_delay": "100ms"}))
    d.start()
    pids = {cid: d.pair(cid)["worker"]["pid"] for cid in ("acme", "bob")}
    zygote = zygote_of(d)
    mark = d.log_mark()
    os.kill(zygote, signal.SIGKILL)
    wait_until(lambda: d.log_lines("zygote exited; its workers run on, new ones are exec'd until it is back", mark),
               5, what="the daemon to notice")
    assert process_gone(zygote)
    time.sleep(1.0)  # several heartbeats
    for cid, pid in pids.items():
        snap = d.snapshot(cid)
        assert (snap["state"], snap["worker"]["pid"], snap["worker"]["restarts"]) == ("connected", pid, 0)
        assert not process_gone(pid)
    carol = d.pair("carol")["worker"]["pid"]  # exec'd, or forked by the replacement
    assert int(stat_fields(carol)[1]) == d.pid
    new = zygote_of(d)
    assert new != zygote
    assert d.post("acme", "restart").status == 202
    acme = d.wait_state("acme", "connected", check=lambda s: s["worker"]["pid"] not in (None, pids["acme"]))
    assert "whatsappd.worker.zygote" in cmdline(acme["worker"]["pid"])
    left = {p: s for p, s in children(d.pid).items() if p not in (new, carol, pids["bob"], acme["worker"]["pid"])}
    assert left == {}, {p: cmdline(p) for p in left}  # nothing else: no zombie, no stray process
    assert d.stop() == 0
    assert all(process_gone(p) for p in (new, carol, pids["bob"], acme["worker"]["pid"]))


@pytest.mark.slow
def test_a_hung_zygote_is_killed_and_replaced_and_meanwhile_workers_are_execd(daemons):
    """A frozen zygote: the next start is exec'd after the fork timeout, the zygote killed and replaced."""
    d = daemons(sim_config("acme", "bob"))
    d.start()
    first = d.pair("acme")["worker"]["pid"]
    zygote = zygote_of(d)
    os.kill(zygote, signal.SIGSTOP)
    wait_until(lambda: process_state(zygote) == "T", 5)
    started = time.monotonic()
    bob = d.pair("bob", timeout=20)["worker"]["pid"]
    assert time.monotonic() - started < 15
    assert "-m whatsappd.worker --" in cmdline(bob)  # exec'd
    assert d.log_lines("killing the zygote", reason="hung")
    assert d.log_lines("the zygote did not start this worker; exec'ing it", company="bob")
    wait_until(lambda: process_gone(zygote), 5, what="the hung zygote to be gone")
    assert zygote_of(d) != zygote
    assert d.snapshot("acme")["worker"]["pid"] == first and not process_gone(first)
    assert d.stop() == 0


def test_kill_9_of_the_daemon_leaves_neither_zygote_nor_worker(daemons):
    """kill -9 of the daemon: its zygote dies with it, and so do the workers the zygote forked."""
    d = daemons(sim_config("acme", "bob"))
    d.start()
    workers = [d.pair(cid)["worker"]["pid"] for cid in ("acme", "bob")]
    zygote = zygote_of(d)
    d.kill()
    wait_until(lambda: all(process_gone(p) for p in (zygote, *workers)), 5, what="zygote and workers to die")


def test_start_stop_cycles_leak_no_process_and_no_fd(daemons):
    """30 connect/stop cycles through the zygote: the daemon's and the zygote's fds and children stay put."""
    d = daemons(sim_config("acme", "bob"))
    d.start()
    for cid in ("acme", "bob"):
        d.pair(cid)
        assert d.client.request("DELETE", f"/v1/companies/{cid}").status == 200
    zygote = zygote_of(d)

    def process_fds() -> list[str]:  # what a start holds (the store's own fds come and go by thread)
        return [f for f in fds(d.pid) if f.startswith(("socket:", "pipe:", "anon_inode:[pidfd]"))]

    daemon_fds, zygote_fds = process_fds(), fds(zygote)
    for _ in range(15):
        for cid in ("acme", "bob"):
            assert d.post(cid, "connect").status == 202
        for cid in ("acme", "bob"):
            d.wait_state(cid, "connected", timeout=20)
            assert d.client.request("DELETE", f"/v1/companies/{cid}").status == 200
    wait_until(lambda: set(children(d.pid)) == {zygote}, 5, what="only the zygote to be left")
    # (the API connection of the last request may still be closing: no more fds than before)
    wait_until(lambda: len(process_fds()) <= len(daemon_fds), 5, what="the daemon's fds to be as before")
    assert fds(zygote) == zygote_fds
    assert zygote_of(d) == zygote
    assert len(d.log_lines("worker started")) == 32
    assert all(e["exit_code"] == 0 for e in d.log_lines("worker exited"))


def test_neonize_python_side_imports_without_the_go_library_and_loads_it_after_a_fork() -> None:
    """Imported as a zygote imports it, neonize maps no Go library and starts no thread; a forked child loads it."""
    script = textwrap.dedent(
        """
        import os, threading
        from whatsappd.worker import neonize
        neonize.GO_LIBRARY_AT_IMPORT = False  # as a zygote imports it
        from whatsappd.worker.neonize import lib as neonize_lib
        import whatsappd.worker.neonize.engine  # the engine imports cleanly on top
        maps = lambda: open("/proc/self/maps").read()
        assert "neonize-" not in maps() and threading.active_count() == 1 and not neonize_lib.library_loaded()
        pid = os.fork()
        if pid == 0:
            neonize_lib.load_library()
            import neonize.client
            ok = neonize_lib.library_loaded() and "neonize-" in maps() and neonize.client.gocode.GetVersion()
            os._exit(0 if ok == b"0.5.2" else 1)
        _, status = os.waitpid(pid, 0)
        print("child", os.waitstatus_to_exitcode(status))
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "child 0"


def test_neonize_signatures_set_on_first_use_equal_neonizes_own() -> None:
    """Loaded after a fork, every Go function gets exactly the signature neonize's own import gives it."""
    script = textwrap.dedent(
        """
        import json, re, sys
        from whatsappd.worker import neonize
        neonize.GO_LIBRARY_AT_IMPORT = sys.argv[1] == "eager"
        from whatsappd.worker.neonize import lib as neonize_lib
        import neonize._binder as binder
        if sys.argv[1] == "on-use":
            neonize_lib.load_library()
        import neonize.client
        assert neonize.client.gocode is binder.gocode
        out = {}
        for name in sorted(set(re.findall(r"gocode\\.(\\w+)|\\"(\\w+)\\",", open(binder.__file__).read()))):
            name = name[0] or name[1]
            try:
                f = getattr(binder.gocode, name)
            except AttributeError:
                continue
            out[name] = [repr(f.argtypes), repr(f.restype), getattr(f.errcheck, "__name__", None)]
        print(json.dumps(out, sort_keys=True))
        """
    )
    runs = {mode: subprocess.run([sys.executable, "-c", script, mode], capture_output=True, text=True, timeout=60)
            for mode in ("eager", "on-use")}
    for mode, run in runs.items():
        assert run.returncode == 0, (mode, run.stderr)
    eager, on_use = (json.loads(runs[m].stdout) for m in ("eager", "on-use"))
    assert len(eager) > 90 and eager["SendMessage"][0] != "None"
    assert on_use == eager


def test_worker_arguments_read_directly_agree_with_argparse(monkeypatch: pytest.MonkeyPatch) -> None:
    """The worker's direct argument reading gives what argparse gives; anything odd goes to argparse."""
    from whatsappd.worker.__main__ import _argparser, _parse_args

    monkeypatch.setenv("WHATSAPPD_PROXY", "socks5://127.0.0.1:1080")
    base = ["--company", "acme", "--session-dir", "/s/session-acme", "--engine", "neonize", "--parent-pid", "7",
            "--heartbeat", "0.2", "--log-format", "json", "--log-level", "info", "--channel-fd", "5"]
    for argv in (base, [*base, "--pair"], ["--pair", *base[:-2], "--channel-fd", "9", "--proxy", "socks5://127.0.0.1:1"],
                 base[:-6] + ["--channel-fd", "5"]):
        assert _parse_args(argv) == _argparser().parse_args(argv)
    for bad in (base[:-2], [*base, "--bogus", "1"], [*base[:-1], "five"], ["--engine", "other", *base[2:]]):
        with pytest.raises(SystemExit) as exit_:
            _parse_args(bad)
        assert exit_.value.code == 2


def test_configuring_logging_again_the_same_way_changes_nothing(restore_logging: None) -> None:
    """configure_logging with the settings in force keeps the handler; other settings replace it."""
    import io
    import logging

    from whatsappd.logs import configure_logging

    stream = io.StringIO()
    configure_logging("json", "info", stream=stream)
    handler = logging.getLogger().handlers[0]
    configure_logging("json", "info", stream=stream)
    assert logging.getLogger().handlers == [handler]
    configure_logging("json", "debug", stream=stream)
    assert logging.getLogger().handlers != [handler] and logging.getLogger().level == logging.DEBUG
    logging.getLogger().setLevel(logging.WARNING)  # changed behind its back: configured again
    configure_logging("json", "debug", stream=stream)
    assert logging.getLogger().level == logging.DEBUG


def test_the_replay_command_exists_only_for_benchmarks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`replay` is an unknown op unless $WHATSAPPD_NEONIZE_REPLAY=1, and needs a dialing client."""
    from whatsappd.worker.engine import EngineError, EngineOptions
    from whatsappd.worker.neonize.engine import REPLAY_ENV, NeonizeEngine

    engine = NeonizeEngine(EngineOptions(company="acme", session_dir=tmp_path, proxy=None, pair=True), lambda m: None)
    monkeypatch.delenv(REPLAY_ENV, raising=False)
    with pytest.raises(EngineError) as err:
        engine.command("replay", {"count": 1})
    assert err.value.code == "unknown_op"
    monkeypatch.setenv(REPLAY_ENV, "1")
    with pytest.raises(EngineError) as err:
        engine.command("replay", {"count": 1})
    assert err.value.code == "not_connected"
    with pytest.raises(EngineError) as err:
        engine.command("replay", {"count": 0})
    assert err.value.code == "invalid_argument"


def test_on_a_kernel_without_the_process_wide_switch_every_writable_private_mapping_is_marked_mergeable(tmp_path):
    """The pre-6.4 path (MADV_MERGEABLE per mapping, as on Debian 12's kernel): a process that calls it has
    the mergeable flag ('mg') on every private writable mapping KSM can take, and no other process does."""
    script = ("import sys\n"
              "from whatsappd.worker.__main__ import mark_mappings_mergeable\n"
              "print(mark_mappings_mergeable(), flush=True)\n"
              "sys.stdin.read()\n")
    child = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None
        taken = int(child.stdout.readline())
        mappings = _writable_private_mappings(child.pid)
        assert taken == len(mappings) > 10
        assert all("mg" in flags for _, flags in mappings), [name for name, flags in mappings if "mg" not in flags]
        assert not any("mg" in flags for _, flags in _writable_private_mappings(os.getpid()))  # pytest itself: untouched
    finally:
        assert child.stdin is not None
        child.stdin.close()
        child.wait(timeout=10)
        if child.stdout is not None:
            child.stdout.close()


def _writable_private_mappings(pid: int) -> list[tuple[str, list[str]]]:
    """(name, VmFlags) of each private writable mapping in /proc/PID/smaps that KSM may merge."""
    out: list[tuple[str, list[str]]] = []
    name: str | None = None
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        fields = line.split()
        if fields and "-" in fields[0] and len(fields) >= 5 and not fields[0].endswith(":"):
            perms = fields[1]
            label = fields[5] if len(fields) > 5 else ""
            writable = perms[1] == "w" and perms[3] == "p" and label not in ("[vvar]", "[vdso]", "[vsyscall]", "[vvar_vclock]")
            name = label if writable else None
        elif fields and fields[0] == "VmFlags:" and name is not None:
            out.append((name, fields[1:]))
            name = None
    return out
