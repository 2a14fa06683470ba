"""`whatsappd import-baileys`: the shared Baileys fixture converted, and every refusal leaving all as it was.

The fixture (tests/fixtures/baileys/, synthetic keys only: see its README) is copied under
tmp_path for each test; its files are aged past --min-idle unless a test wants them fresh.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from baileys_fixture import JID, PEER_A, age, baileys7, baileys_copy, edit, flip_bit, tree

from whatsappd.baileys import PROVENANCE_FILE, import_company, import_root
from whatsappd.baileys.verify import listed_jids
from whatsappd.sessions import lock_session, session_state
from whatsappd.testing.scenario import daemon_pool, sim_config


def write_config(tmp_path: Path) -> tuple[Path, Path]:
    """A config whose state dir is under tmp_path; returns (config path, sessions root)."""
    config = tmp_path / "whatsappd.toml"
    config.write_text(f'[daemon]\nstate_dir = "{tmp_path / "state"}"\n')
    return config, tmp_path / "state" / "sessions"


def cli(config: Path, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "whatsappd", "import-baileys", "--config", str(config), *args],
                          capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)


def cli_json(config: Path, *args: str) -> tuple[int, dict[str, Any]]:
    proc = cli(config, *args, "--json")
    return proc.returncode, json.loads(proc.stdout)


def assert_nothing_written(sessions_root: Path) -> None:
    assert not sessions_root.exists() or list(sessions_root.iterdir()) == [], list(sessions_root.iterdir())


# ------------------------------------------------------------------ the fixture converted


def test_dry_run_checks_every_key_counts_match_the_folder_and_writes_nothing(tmp_path: Path) -> None:
    """--dry-run on the fixture: all key pairs and signatures verify, counts equal the folder's files, nothing written."""
    source = baileys_copy(tmp_path / "crm")
    before = tree(source)
    config, sessions_root = write_config(tmp_path)
    code, out = cli_json(config, "--from", str(source), "--company", "seven", "--dry-run")
    assert code == 0, out
    (report,) = out["companies"]
    assert report["ok"] and report["error"] is None and report["dry_run"]
    files = [p.name for p in source.iterdir()]
    pre_keys = [n for n in files if n.startswith("pre-key-")]
    assert report["counts"]["pre_keys"] == len(pre_keys) == 34
    assert report["counts"]["pre_keys_uploaded"] == 29  # ids 2..30: below firstUnuploadedPreKeyId 31
    assert report["counts"]["sessions"] == len([n for n in files if n.startswith("session-")]) == 3
    assert report["counts"]["sender_keys"] == len([n for n in files if n.startswith("sender-key-")]) == 1
    assert report["counts"]["app_state_sync_keys"] == 1 and report["counts"]["app_state_versions"] == 1
    # noise, identity and signed pre-key; every pre-key; each session's ratchet key; our group signing key
    assert report["checks"] == {"key_pairs": 3 + 34 + 3 + 1, "signatures": 3}
    assert report["jid"] == JID and report["lid"] == "123456789012345:12@lid" and report["push_name"] == "Agência Sete"
    assert {u["item"] for u in report["unmapped"]} >= {"creds.json: pairingEphemeralKeyPair", "creds.json: routingInfo"}
    assert all(u["reason"] for u in report["unmapped"])
    assert tree(source) == before
    assert not (tmp_path / "state").exists()


@pytest.mark.neonize
def test_import_writes_a_private_store_neonize_lists_with_the_fixture_jid(tmp_path: Path) -> None:
    """The import puts store.db (0600, dir 0700) in session-{id}/ and neonize 0.5.2 lists the fixture's JID."""
    source = baileys_copy(tmp_path / "crm")
    before = tree(source)
    config, sessions_root = write_config(tmp_path)
    code, out = cli_json(config, "--from", str(source), "--company", "seven")
    assert code == 0, out
    (report,) = out["companies"]
    assert report["ok"] and report["neonize_jid"] == JID
    target = sessions_root / "session-seven"
    assert stat.S_IMODE(target.stat().st_mode) == 0o700
    for name in ("store.db", PROVENANCE_FILE):
        assert stat.S_IMODE((target / name).stat().st_mode) == 0o600
    assert listed_jids(target / "store.db") == [JID]  # again, independently of the import's own check
    assert session_state(target) == "paired"
    assert sorted(p.name for p in sessions_root.iterdir()) == ["session-seven"]  # no temporary left
    provenance = json.loads((target / PROVENANCE_FILE).read_text())
    assert provenance["source"] == str(source.resolve())
    assert provenance["creds_sha256"] == hashlib.sha256((source / "creds.json").read_bytes()).hexdigest()
    assert provenance["counts"] == report["counts"] and provenance["skipped"] and provenance["jid"] == JID
    assert tree(source) == before


def test_pre_keys_keep_the_uploaded_flag_and_never_reuse_a_handed_out_id(tmp_path: Path) -> None:
    """Uploaded = id < firstUnuploadedPreKeyId; if the newest uploaded ids were used up, a placeholder keeps MAX(key_id)."""
    source = baileys_copy(tmp_path / "crm")
    # the newest pre-keys 31..35 were uploaded and all used up by contacts
    edit(source, "creds.json", lambda c: c.update(firstUnuploadedPreKeyId=36))
    for n in range(31, 36):
        (source / f"pre-key-{n}.json").unlink()
    age(source)
    report = import_company(source, "seven", tmp_path / "sessions", dry_run=True, min_idle=60)
    assert report.ok, report.error
    assert report.counts["pre_keys"] == 30 and report.counts["pre_keys_uploaded"] == 30  # 29 files + placeholder 35
    assert any("placeholder row with id 35" in w for w in report.warnings)


# ------------------------------------------------------------------ refusals


PRIVATE_KEYS = {
    "noise key": ("creds.json", lambda c: c["noiseKey"]["private"].update(data=flip_bit(c["noiseKey"]["private"]["data"]))),
    "identity key": ("creds.json", lambda c: c["signedIdentityKey"]["private"].update(
        data=flip_bit(c["signedIdentityKey"]["private"]["data"]))),
    "signed pre-key": ("creds.json", lambda c: c["signedPreKey"]["keyPair"]["private"].update(
        data=flip_bit(c["signedPreKey"]["keyPair"]["private"]["data"]))),
    "a pre-key": ("pre-key-17.json", lambda k: k["private"].update(data=flip_bit(k["private"]["data"]))),
    "a session's ratchet key": (PEER_A, lambda s: [e["currentRatchet"]["ephemeralKeyPair"].update(
        privKey=flip_bit(e["currentRatchet"]["ephemeralKeyPair"]["privKey"])) for e in s["_sessions"].values()]),
    "our group signing key": ("sender-key-120363025555555555@g.us--5511999990000--12.json",
                              lambda ks: ks[0]["senderSigningKey"].update(private=flip_bit(ks[0]["senderSigningKey"]["private"]))),
}


@pytest.mark.parametrize("which", sorted(PRIVATE_KEYS))
def test_one_flipped_bit_in_any_private_key_refuses_the_company(tmp_path: Path, which: str) -> None:
    """A private key with one bit flipped no longer matches its public key: refused in one sentence, nothing written."""
    source = baileys_copy(tmp_path / "crm")
    name, change = PRIVATE_KEYS[which]
    edit(source, name, change)
    before = tree(source)
    config, sessions_root = write_config(tmp_path)
    proc = cli(config, "--from", str(source), "--company", "seven")
    assert proc.returncode == 1
    refusal = [line for line in proc.stdout.splitlines() if line.startswith("refused seven")]
    assert len(refusal) == 1 and "does not match its public key" in refusal[0] and name in refusal[0], proc.stdout
    assert tree(source) == before
    assert_nothing_written(sessions_root)


@pytest.mark.parametrize("field", ["accountSignature", "deviceSignature"])
def test_a_signature_that_does_not_verify_refuses_the_company(tmp_path: Path, field: str) -> None:
    """The ADV account and device signatures are verified (XEdDSA); a flipped bit refuses the company."""
    source = baileys_copy(tmp_path / "crm")
    edit(source, "creds.json", lambda c: c["account"].update({field: flip_bit(c["account"][field], 20)}))
    report = import_company(source, "seven", tmp_path / "sessions", min_idle=60)
    assert not report.ok and report.error is not None
    assert report.error["code"] == "key_mismatch" and "signature does not verify" in report.error["message"]
    assert not (tmp_path / "sessions").exists()


def test_a_truncated_creds_json_refuses_the_company(tmp_path: Path) -> None:
    """creds.json cut short: refused as malformed, with a sentence saying it may be truncated; nothing written."""
    source = baileys_copy(tmp_path / "crm")
    data = (source / "creds.json").read_bytes()
    (source / "creds.json").write_bytes(data[: len(data) // 2])
    age(source)
    before = tree(source)
    config, sessions_root = write_config(tmp_path)
    code, out = cli_json(config, "--from", str(source), "--company", "seven")
    assert code == 1
    error = out["companies"][0]["error"]
    assert error["code"] == "malformed_source" and "truncated" in error["message"] and "\n" not in error["message"]
    assert tree(source) == before
    assert_nothing_written(sessions_root)


@pytest.mark.parametrize("jid", ["5511999990000@s.whatsapp.net", "5511999990000:0@s.whatsapp.net",
                                 "5511999990000:12@g.us", "not a jid"])
def test_a_malformed_jid_refuses_the_company(tmp_path: Path, jid: str) -> None:
    """me.id must be a linked device's JID (user:device@s.whatsapp.net, device not 0); anything else is refused."""
    source = baileys_copy(tmp_path / "crm")
    edit(source, "creds.json", lambda c: c["me"].update(id=jid))
    report = import_company(source, "seven", tmp_path / "sessions", min_idle=60)
    assert report.error is not None and report.error["code"] == "malformed_source" and "me.id" in report.error["message"]
    assert not (tmp_path / "sessions").exists()


def test_a_private_key_of_the_wrong_length_refuses_the_company(tmp_path: Path) -> None:
    """A 31-byte private key is refused before any key is compared."""
    source = baileys_copy(tmp_path / "crm")
    edit(source, "pre-key-9.json", lambda k: k["private"].update(data=base64.b64encode(bytes(31)).decode()))
    report = import_company(source, "seven", tmp_path / "sessions", min_idle=60)
    assert report.error is not None and report.error["code"] == "malformed_source"
    assert "pre-key-9.json" in report.error["message"] and "31 bytes, not 32" in report.error["message"]


def test_an_unpaired_folder_is_refused_saying_a_qr_is_needed(tmp_path: Path) -> None:
    """A creds.json without an account (pairing never finished) is refused: there is nothing to move."""
    source = baileys_copy(tmp_path / "crm")
    edit(source, "creds.json", lambda c: [c.pop("me"), c.pop("account")])
    report = import_company(source, "seven", tmp_path / "sessions", min_idle=60)
    assert report.error is not None and report.error["code"] == "not_paired" and "QR" in report.error["message"]


def test_a_recently_changed_folder_is_refused_as_baileys_may_still_run(tmp_path: Path) -> None:
    """A file changed within --min-idle (default 120 s): refused, the message says to stop the CRM's module."""
    source = baileys_copy(tmp_path / "crm")
    os.utime(source / PEER_A)  # Baileys just wrote a session
    config, sessions_root = write_config(tmp_path)
    code, out = cli_json(config, "--from", str(source), "--company", "seven")
    assert code == 1
    error = out["companies"][0]["error"]
    assert error["code"] == "source_busy" and PEER_A in error["message"] and "--min-idle" in error["message"]
    assert_nothing_written(sessions_root)


@pytest.mark.neonize
def test_a_session_file_changing_during_the_import_aborts_it(tmp_path: Path) -> None:
    """A file written while the store is being checked: the import aborts, leaves no store and no temporary."""
    source = baileys_copy(tmp_path / "crm")
    config, sessions_root = write_config(tmp_path)
    proc = subprocess.Popen([sys.executable, "-m", "whatsappd", "import-baileys", "--config", str(config),
                             "--from", str(source), "--company", "seven", "--json"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL)
    try:
        # the temporary directory appears once the source was read and converted; neonize's check follows
        deadline = time.monotonic() + 60
        while not (sessions_root.exists() and any(p.name.startswith(".import-") for p in sessions_root.iterdir())):
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.002)
        with open(source / PEER_A, "a") as f:  # Baileys writes the session again
            f.write(" ")
        before = tree(source)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 1, stdout + stderr
    error = json.loads(stdout)["companies"][0]["error"]
    assert error["code"] == "source_changed" and PEER_A in error["message"]
    assert tree(source) == before  # the importer itself wrote nothing there
    assert_nothing_written(sessions_root)


def test_a_running_company_holding_its_session_lock_is_refused(tmp_path: Path) -> None:
    """The worker's session flock is held: refused as running; the lock holder's files stay untouched."""
    source = baileys_copy(tmp_path / "crm")
    config, sessions_root = write_config(tmp_path)
    target = sessions_root / "session-seven"
    target.mkdir(parents=True, mode=0o700)
    fd = lock_session(target)  # what a running worker holds for its whole life
    assert fd is not None
    try:
        before = tree(sessions_root)
        code, out = cli_json(config, "--from", str(source), "--company", "seven")
    finally:
        os.close(fd)
    assert code == 1
    error = out["companies"][0]["error"]
    assert error["code"] == "company_running" and "whatsappd.lock" in error["message"]
    assert tree(sessions_root) == before


def test_a_company_running_under_the_daemon_is_refused(tmp_path: Path) -> None:
    """A company whose worker runs under a real daemon: its session lock refuses the import; the session is untouched."""
    source = baileys_copy(tmp_path / "crm")
    with daemon_pool(tmp_path / "daemon") as make:
        d = make(sim_config("seven"))
        d.start()
        d.pair("seven")
        before = tree(d.session_dir("seven"))
        report = import_company(source, "seven", d.state_dir / "sessions", min_idle=60)
        assert report.error is not None and report.error["code"] == "company_running", report.error
        assert tree(d.session_dir("seven")) == before
        assert d.snapshot("seven")["state"] == "connected"
        assert d.stop() == 0


@pytest.mark.parametrize("existing", ["store.db", "simulator.json"])
def test_an_existing_session_is_never_overwritten(tmp_path: Path, existing: str) -> None:
    """A company that already has a whatsappd session (neonize or simulator) is refused; its files stay as they were."""
    source = baileys_copy(tmp_path / "crm")
    config, sessions_root = write_config(tmp_path)
    target = sessions_root / "session-seven"
    target.mkdir(parents=True, mode=0o700)
    (target / existing).write_bytes(b"whatsappd's own session")
    before = tree(sessions_root)
    code, out = cli_json(config, "--from", str(source), "--company", "seven")
    assert code == 1
    error = out["companies"][0]["error"]
    assert error["code"] == "session_exists" and existing in error["message"] and "never overwrites" in error["message"]
    assert tree(sessions_root) == before


def test_a_symbolic_link_in_the_folder_is_refused(tmp_path: Path) -> None:
    """A Baileys folder holds plain files only; a link is refused, never followed."""
    source = baileys_copy(tmp_path / "crm")
    (source / "pre-key-99.json").symlink_to(source / "pre-key-2.json")
    report = import_company(source, "seven", tmp_path / "sessions", min_idle=0)
    assert report.error is not None and report.error["code"] == "not_baileys" and "symbolic link" in report.error["message"]


def test_a_source_folder_that_is_a_symbolic_link_is_refused(tmp_path: Path) -> None:
    """session-{id} given as a link to a real Baileys folder: refused as not_baileys, never followed, nothing written."""
    real = baileys_copy(tmp_path / "elsewhere")
    (tmp_path / "crm").mkdir()
    link = tmp_path / "crm" / "session-7"
    link.symlink_to(real)
    before = tree(real)
    config, sessions_root = write_config(tmp_path)
    code, out = cli_json(config, "--from", str(link), "--company", "seven")
    assert code == 1
    error = out["companies"][0]["error"]
    assert error["code"] == "not_baileys" and f"{link} is a symbolic link" in error["message"], error
    assert tree(real) == before
    assert_nothing_written(sessions_root)


# ------------------------------------------------------------------ a whole CRM root


def mixed_root(tmp_path: Path) -> Path:
    """Two Baileys folders, a browser profile, an empty directory, a stray file and an invalid name."""
    root = tmp_path / "crm-sessions"
    baileys_copy(root, "session-7")
    baileys_copy(root, "session-42")
    (root / "session-acme" / "Default").mkdir(parents=True)
    (root / "session-acme" / "Default" / "Preferences").write_text("{}")
    (root / "session-empty").mkdir()
    (root / "notes.txt").write_text("old CRM")
    baileys_copy(root, "session-Bad Name")
    return root


@pytest.mark.neonize
def test_from_root_all_imports_exactly_the_baileys_folders(tmp_path: Path) -> None:
    """--from-root ROOT --all imports the Baileys folders only; the browser profile and odd names are skipped, saying why."""
    root = mixed_root(tmp_path)
    before = tree(root)
    config, sessions_root = write_config(tmp_path)
    code, out = cli_json(config, "--from-root", str(root), "--all")
    assert code == 0, out
    assert sorted(r["company"] for r in out["companies"]) == ["42", "7"]
    assert all(r["ok"] and r["neonize_jid"] == JID for r in out["companies"])
    skipped = {Path(s["path"]).name: s["reason"] for s in out["skipped"]}
    assert set(skipped) == {"session-acme", "session-Bad Name"} and "browser profile" in skipped["session-acme"]
    assert sorted(p.name for p in sessions_root.iterdir()) == ["session-42", "session-7"]
    assert tree(root) == before


def test_from_root_with_companies_takes_only_those(tmp_path: Path) -> None:
    """--from-root ROOT --company 42 (dry run) considers only session-42; a missing id is refused by name."""
    root = mixed_root(tmp_path)
    result = import_root(root, tmp_path / "sessions", ["42", "99"], dry_run=True, min_idle=60)
    assert [(r.company, r.ok) for r in result.reports] == [("42", True), ("99", False)]
    assert result.reports[1].error == {"code": "source_not_found", "message": f"{root} has no Baileys folder session-99"}


@pytest.mark.parametrize("args", [["--from", "X"], ["--from", "X", "--company", "a", "--company", "b"],
                                  ["--from", "X", "--company", "a", "--all"], ["--from-root", "X"],
                                  ["--from-root", "X", "--all", "--company", "a"]])
def test_bad_argument_combinations_are_usage_errors(tmp_path: Path, args: list[str]) -> None:
    """--from needs exactly one --company; --from-root needs --company IDs or --all, not both: exit 2."""
    config, _ = write_config(tmp_path)
    proc = cli(config, *args)
    assert proc.returncode == 2 and proc.stderr.strip(), proc.stdout


# ------------------------------------------------------------------ Baileys 7


def test_baileys_7_dry_run_maps_lids_identities_and_privacy_tokens(tmp_path: Path) -> None:
    """The Baileys 7 fixture: LID-addressed session, identity-key, lid-mapping, tctoken, Buffer-wrapped sender key."""
    source = baileys7(tmp_path / "crm")
    before = tree(source)
    report = import_company(source, "eight", tmp_path / "sessions", dry_run=True, min_idle=60)
    assert report.ok, report.error
    files = [p.name for p in source.iterdir()]
    assert report.baileys_layout == "7" and report.jid == JID and report.lid == "123456789012345:12@lid"
    assert report.counts["pre_keys"] == len([n for n in files if n.startswith("pre-key-")]) == 22
    assert report.counts["pre_keys_uploaded"] == 19  # ids 2..20
    assert report.counts["sessions"] == 2 and report.counts["sender_keys"] == 1
    assert report.counts["lid_mappings"] == 2  # ours (me.lid) and contact A's
    assert report.counts["privacy_tokens"] == 1
    # both contacts, our primary phone under its number and under its LID
    assert report.counts["identity_keys"] == 4
    assert report.checks == {"key_pairs": 3 + 22 + 2 + 1, "signatures": 3}
    assert "device-list-*.json (2 files)" in {u.item for u in report.unmapped}
    assert tree(source) == before
    assert not (tmp_path / "sessions").exists()


@pytest.mark.neonize
def test_baileys_7_import_opens_in_neonize(tmp_path: Path) -> None:
    """The Baileys 7 fixture imports and neonize lists its JID."""
    report = import_company(baileys7(tmp_path / "crm"), "eight", tmp_path / "sessions", min_idle=60)
    assert report.ok and report.neonize_jid == JID, report.error


def test_the_fingerprint_is_encoded_as_neonize_s_protobuf_does(tmp_path: Path) -> None:
    """The app-state key fingerprint bytes equal what the compiled WhatsApp protobuf in neonize produces."""
    code = ("from neonize.proto.waE2E.WAWebProtobufsE2E_pb2 import AppStateSyncKeyFingerprint as F\n"
            "import sys\nsys.stdout.write(F(rawID=1234567, currentIndex=3, deviceIndexes=[0, 3]).SerializeToString().hex())")
    expected = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True).stdout
    from whatsappd.baileys.convert import fingerprint_proto

    assert fingerprint_proto({"rawId": 1234567, "currentIndex": 3, "deviceIndexes": [0, 3]}).hex() == expected


@pytest.mark.root
@pytest.mark.neonize
def test_run_as_root_the_new_session_belongs_to_the_sessions_directory_owner(tmp_path: Path) -> None:
    """Imported as root into a sessions directory the daemon's user owns: every new file is that user's."""
    source = baileys_copy(tmp_path / "crm")
    sessions_root = tmp_path / "sessions"
    sessions_root.mkdir(mode=0o700)
    os.chown(sessions_root, 65534, 65534)
    report = import_company(source, "seven", sessions_root, min_idle=60)
    assert report.ok, report.error
    target = sessions_root / "session-seven"
    for path in [target, *target.iterdir()]:
        assert (path.stat().st_uid, path.stat().st_gid) == (65534, 65534), path


def test_a_deleted_file_counts_as_a_recent_change(tmp_path: Path) -> None:
    """Baileys deletes used pre-keys: a folder whose file list changed within --min-idle is refused too."""
    source = baileys_copy(tmp_path / "crm")
    (source / "pre-key-2.json").unlink()  # the directory's mtime is now
    report = import_company(source, "seven", tmp_path / "sessions", dry_run=True)
    assert report.error is not None and report.error["code"] == "source_busy"
    assert "the list of files" in report.error["message"]


def test_a_session_directory_that_is_a_link_is_refused(tmp_path: Path) -> None:
    """session-{id} as a symbolic link: refused, nothing written through it."""
    source = baileys_copy(tmp_path / "crm")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (tmp_path / "sessions").mkdir()
    (tmp_path / "sessions" / "session-seven").symlink_to(elsewhere)
    report = import_company(source, "seven", tmp_path / "sessions", min_idle=60)
    assert report.error is not None and report.error["code"] == "session_exists" and "symbolic link" in report.error["message"]
    assert list(elsewhere.iterdir()) == []
