"""whatsappd.legacy: finding and removing the old CRM's sessions, never whatsappd's own."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from whatsappd.legacy import (
    Failed,
    LegacyError,
    LegacySession,
    Removed,
    SessionsRootMissing,
    find_legacy,
    format_size,
    remove_legacy,
    scan_legacy,
)


def _write(path: Path, size: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x" * size)
    return path


def _browser(root: Path, name: str, marker: str = "Default") -> Path:
    d = root / name
    if marker == "DevToolsActivePort":
        _write(d / marker, 10)
    else:
        (d / marker).mkdir(parents=True)
        _write(d / marker / "Preferences", 100)
    _write(d / "Local State", 50)
    return d


def _baileys(root: Path, name: str) -> Path:
    d = root / name
    _write(d / "creds.json", 300)
    _write(d / "pre-key-1.json", 20)
    return d


def _snapshot(root: Path) -> dict[str, tuple[int, int]]:
    """Every path under root (links not followed) with its size and mtime, to prove nothing changed."""
    out: dict[str, tuple[int, int]] = {}
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        for name in dirnames + filenames:
            st = os.lstat(os.path.join(dirpath, name))
            out[os.path.relpath(os.path.join(dirpath, name), root)] = (st.st_size, st.st_mtime_ns)
    return out


@pytest.fixture
def root(tmp_path: Path) -> Path:
    r = tmp_path / "sessions"
    r.mkdir()
    return r.resolve()


@pytest.mark.parametrize("marker", ["Crashpad", "Default", "DevToolsActivePort"])
def test_browser_profile_found_by_each_marker(root: Path, marker: str) -> None:
    """Any one of Crashpad/, Default/, DevToolsActivePort marks a Chrome profile."""
    _browser(root, "session-acme", marker)
    assert find_legacy(root) == [
        LegacySession(root / "session-acme", "browser", _tree_bytes(root / "session-acme"), "acme")
    ]


def test_browser_marker_of_wrong_type_is_not_a_marker(root: Path) -> None:
    """A file named Default, or a symlink named Crashpad, is not a Chrome profile."""
    _write(root / "session-a" / "Default", 5)
    (root / "session-b").mkdir()
    (root / "elsewhere").mkdir()
    (root / "session-b" / "Crashpad").symlink_to(root / "elsewhere")
    assert find_legacy(root) == []


def test_baileys_session_found(root: Path) -> None:
    """A directory holding creds.json is a Baileys session, with its company id."""
    _baileys(root, "session-42")
    [found] = find_legacy(root)
    assert (found.path, found.kind, found.company_id, found.size_bytes) == (
        root / "session-42",
        "baileys",
        "42",
        320,
    )


def test_chrome_root_databases_do_not_make_a_profile_look_like_whatsappd(root: Path) -> None:
    """Chrome's own first_party_sets.db at the profile root is not a whatsappd store."""
    d = _browser(root, "session-acme")
    _write(d / "first_party_sets.db", 4096)
    _write(d / "first_party_sets.db-journal", 0)
    [found] = find_legacy(root)
    assert found.kind == "browser"


@pytest.mark.parametrize(
    "files",
    [
        ["whatsappd.lock", "store.db", "store.db-wal", "store.db-shm"],
        ["whatsappd.lock", "simulator.json"],
        ["store.db"],
        ["whatsappd.lock"],
    ],
)
def test_whatsappd_session_is_never_found_nor_touched(root: Path, files: list[str]) -> None:
    """whatsappd's own sessions (neonize store, simulator, lock) are neither listed nor removed."""
    for name in files:
        _write(root / "session-acme" / name, 64)
    before = _snapshot(root)
    scan = scan_legacy(root)
    assert scan.found == () and scan.skipped == ()
    assert remove_legacy(scan.found, root) == []
    assert _snapshot(root) == before


@pytest.mark.parametrize("legacy", ["browser", "baileys"])
def test_mixed_directory_is_skipped_with_reason(root: Path, legacy: str) -> None:
    """Legacy markers plus whatsappd files: reported as skipped, treated as whatsappd's."""
    d = _browser(root, "session-acme") if legacy == "browser" else _baileys(root, "session-acme")
    _write(d / "whatsappd.lock")
    _write(d / "store.db", 10)
    scan = scan_legacy(root)
    assert scan.found == ()
    [skipped] = scan.skipped
    assert skipped.path == root / "session-acme"
    assert "whatsappd.lock" in skipped.reason and "store.db" in skipped.reason
    assert "left alone" in skipped.reason


def test_symlinked_child_is_skipped_and_its_target_untouched(root: Path, tmp_path: Path) -> None:
    """A symlink in the root is reported, never followed, and removing it is refused."""
    target = _baileys(tmp_path, "precious")
    (root / "session-link").symlink_to(target)
    before = _snapshot(target)
    scan = scan_legacy(root)
    assert scan.found == ()
    assert [(s.path, "symbolic link" in s.reason) for s in scan.skipped] == [(root / "session-link", True)]
    forged = LegacySession(root / "session-link", "baileys", 0, "link")
    [result] = remove_legacy([forged], root)
    assert isinstance(result, Failed) and "symbolic link" in result.reason
    assert (root / "session-link").is_symlink()
    assert _snapshot(target) == before


def test_non_directory_children_are_ignored(root: Path) -> None:
    """Plain files in the root (even named like sessions or creds) are not reported at all."""
    _write(root / "creds.json", 10)
    _write(root / "session-file", 10)
    _baileys(root, "session-1")
    scan = scan_legacy(root)
    assert [s.path.name for s in scan.found] == ["session-1"]
    assert scan.skipped == ()


def test_unrelated_directories_are_ignored(root: Path) -> None:
    """A directory with neither legacy nor whatsappd files is not a candidate nor a skip."""
    _write(root / "session-x" / "notes.txt", 3)
    (root / "session-empty").mkdir()
    assert scan_legacy(root).found == () and scan_legacy(root).skipped == ()


def test_dry_run_changes_nothing(root: Path) -> None:
    """Scanning alone (the --dry-run path) leaves every file as it was."""
    _browser(root, "session-a", "Crashpad")
    _baileys(root, "session-b")
    _write(root / "session-c" / "whatsappd.lock")
    before = _snapshot(root)
    assert len(scan_legacy(root).found) == 2
    assert _snapshot(root) == before


def test_remove_deletes_legacy_and_keeps_the_rest(root: Path) -> None:
    """remove_legacy deletes exactly the found sessions and reports each as Removed."""
    _browser(root, "session-a", "Crashpad")
    _baileys(root, "session-b")
    _write(root / "session-c" / "store.db", 10)
    found = find_legacy(root)
    results = remove_legacy(found, root)
    assert results == [Removed(s) for s in found]
    assert sorted(p.name for p in root.iterdir()) == ["session-c"]


def test_remove_does_not_follow_symlinks_inside_a_session(root: Path, tmp_path: Path) -> None:
    """A symlink inside a legacy session is removed as a link; its target survives."""
    outside = _write(tmp_path / "outside" / "keep.txt", 7)
    d = _baileys(root, "session-b")
    (d / "link-to-outside").symlink_to(outside.parent)
    found = find_legacy(root)
    assert found[0].size_bytes == 320  # the link's target is not counted either
    assert remove_legacy(found, root) == [Removed(found[0])]
    assert outside.read_bytes() == b"x" * 7


def test_remove_rechecks_whatsappd_files_appearing_after_scan(root: Path) -> None:
    """A session that gained whatsappd files since the scan is left alone and reported Failed."""
    _baileys(root, "session-acme")
    found = find_legacy(root)
    _write(root / "session-acme" / "whatsappd.lock")
    [result] = remove_legacy(found, root)
    assert isinstance(result, Failed) and "whatsappd.lock" in result.reason
    assert (root / "session-acme" / "creds.json").exists()


def test_remove_rechecks_a_directory_swapped_for_a_symlink(root: Path, tmp_path: Path) -> None:
    """A session replaced by a symlink after the scan is not followed (TOCTOU)."""
    _baileys(root, "session-acme")
    found = find_legacy(root)
    target = _baileys(tmp_path, "victim")
    os.rename(root / "session-acme", tmp_path / "moved")
    (root / "session-acme").symlink_to(target)
    [result] = remove_legacy(found, root)
    assert isinstance(result, Failed)
    assert (target / "creds.json").exists()


def test_remove_refuses_paths_outside_root(root: Path, tmp_path: Path) -> None:
    """Only directories directly inside root are removed, whatever the caller passes."""
    other = _baileys(tmp_path, "session-elsewhere")
    nested = _baileys(root / "session-a", "session-nested")
    dotdot = LegacySession(root / "session-a" / "..", "baileys", 0, None)
    sessions = [
        LegacySession(other, "baileys", 0, None),
        LegacySession(nested, "baileys", 0, None),
        dotdot,
    ]
    results = remove_legacy(sessions, root)
    assert all(isinstance(r, Failed) and "not directly inside" in r.reason for r in results)
    assert (other / "creds.json").exists() and (nested / "creds.json").exists()


def test_remove_collects_errors_per_entry(root: Path) -> None:
    """A session that vanished is one Failed; the others are still removed."""
    _baileys(root, "session-a")
    _baileys(root, "session-b")
    found = find_legacy(root)
    (root / "session-a" / "creds.json").unlink()
    (root / "session-a" / "pre-key-1.json").unlink()
    (root / "session-a").rmdir()
    results = remove_legacy(found, root)
    assert isinstance(results[0], Failed) and "no longer exists" in results[0].reason
    assert results[1] == Removed(found[1])


def test_remove_rechecks_the_kind(root: Path) -> None:
    """A session whose kind changed since the scan is not removed (scan again)."""
    _baileys(root, "session-a")
    found = find_legacy(root)
    (root / "session-a" / "Default").mkdir()
    [result] = remove_legacy(found, root)
    assert isinstance(result, Failed) and "kind" in result.reason


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any directory")
def test_unreadable_directory_is_skipped(root: Path) -> None:
    """A directory that cannot be listed is reported as skipped, not a crash."""
    d = _baileys(root, "session-locked")
    d.chmod(0)
    try:
        [skipped] = scan_legacy(root).skipped
        assert skipped.path == d and "cannot be read" in skipped.reason
    finally:
        d.chmod(0o700)


def test_sizes_are_the_sum_of_regular_files(root: Path) -> None:
    """size_bytes adds every regular file in the tree, nested ones included."""
    d = _browser(root, "session-a", "Default")
    _write(d / "Default" / "Cache" / "data_1", 1_500_000)
    [found] = find_legacy(root)
    assert found.size_bytes == 100 + 50 + 1_500_000
    assert found.describe() == "browser profile, 1.4 MiB"
    assert scan_legacy(root).total_bytes == found.size_bytes


def test_company_id_only_when_valid(root: Path) -> None:
    """company_id comes from session-{id} when the id is valid, else it is None."""
    _baileys(root, "session-Acme Corp")
    _baileys(root, "old-backup")
    _baileys(root, "session-ok_1")
    assert {s.path.name: s.company_id for s in find_legacy(root)} == {
        "old-backup": None,
        "session-Acme Corp": None,
        "session-ok_1": "ok_1",
    }


def test_missing_root_raises_a_clear_error(tmp_path: Path) -> None:
    """A missing root is a FileNotFoundError naming the directory and what to do."""
    missing = tmp_path / "nope"
    with pytest.raises(SessionsRootMissing) as info:
        scan_legacy(missing)
    assert isinstance(info.value, FileNotFoundError) and isinstance(info.value, LegacyError)
    assert str(missing) in str(info.value) and "--path" in str(info.value)


def test_root_that_is_a_file_raises(tmp_path: Path) -> None:
    """A root that is a file is refused with the same clear error."""
    f = _write(tmp_path / "file", 1)
    with pytest.raises(SessionsRootMissing, match="not a directory"):
        find_legacy(f)


def test_root_may_be_a_symlink(tmp_path: Path) -> None:
    """A symlinked root (sessions on another disk) is scanned and cleaned normally."""
    real = tmp_path / "real"
    _baileys(real, "session-a")
    (tmp_path / "link").symlink_to(real)
    found = find_legacy(tmp_path / "link")
    assert remove_legacy(found, tmp_path / "link") == [Removed(found[0])]
    assert list(real.iterdir()) == []


@pytest.mark.parametrize(
    ("n", "text"),
    [
        (0, "0 B"),
        (1023, "1023 B"),
        (1024, "1.0 KiB"),
        (1536, "1.5 KiB"),
        (1_500_000, "1.4 MiB"),
        (1024**2 - 1, "1.0 MiB"),
        (3 * 1024**3, "3.0 GiB"),
        (5 * 1024**5, "5120.0 TiB"),
    ],
)
def test_format_size(n: int, text: str) -> None:
    """format_size uses binary units, one decimal, and never shows 1024.0 of a unit."""
    assert format_size(n) == text


def test_format_size_rejects_negative() -> None:
    """A negative size is a programming error, not a display case."""
    with pytest.raises(ValueError):
        format_size(-1)


def _tree_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())
