"""whatsappd/mediafile.py: a media file is read beneath a pinned directory, never through a symlink.

Real files, directories, symlinks and FIFOs under tmp_path; the race is a real thread swapping
a real directory for a symlink while files are read.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from whatsappd.mediafile import MediaRefused, read_media

LIMIT = 1024 * 1024


def read(path: Path | str, roots: tuple[Path, ...], forbidden: Path | None = None, limit: int = LIMIT) -> bytes:
    return b"".join(read_media(str(path), roots, limit, forbidden))


def refused(path: Path | str, roots: tuple[Path, ...], forbidden: Path | None = None,
            limit: int = LIMIT) -> MediaRefused:
    with pytest.raises(MediaRefused) as caught:
        read(path, roots, forbidden, limit)
    return caught.value


@pytest.fixture
def tree(tmp_path: Path) -> dict[str, Path]:
    """uploads/ (the allowed root) with a/b/photo.jpg; state/ with a secret; outside.txt."""
    root = tmp_path / "uploads"
    (root / "a" / "b").mkdir(parents=True)
    (root / "a" / "b" / "photo.jpg").write_bytes(b"photo")
    state = tmp_path / "state"
    (state / "sessions" / "session-acme").mkdir(parents=True)
    (state / "sessions" / "session-acme" / "store.db").write_bytes(b"SECRET CREDENTIALS")
    (tmp_path / "outside.txt").write_bytes(b"outside")
    return {"root": root, "state": state, "outside": tmp_path / "outside.txt"}


class TestWhereAFileMayBe:
    def test_a_file_beneath_the_root_is_read(self, tree: dict[str, Path]) -> None:
        """A regular file below an allowed directory is read whole."""
        assert read(tree["root"] / "a" / "b" / "photo.jpg", (tree["root"],)) == b"photo"

    def test_a_path_outside_every_root_is_refused(self, tree: dict[str, Path]) -> None:
        """A file outside the allowed directories is refused as `outside`, and so is the root itself."""
        assert refused(tree["outside"], (tree["root"],)).reason == "outside"
        assert refused(tree["root"], (tree["root"],)).reason == "outside"
        assert refused(f"{tree['root']}-other/x", (tree["root"],)).reason == "outside"

    def test_a_symlink_anywhere_below_the_root_is_refused(self, tree: dict[str, Path]) -> None:
        """A symlink as the file or as any directory below the root is refused, even one pointing inside."""
        root = tree["root"]
        (root / "to-outside").symlink_to(tree["outside"])
        (root / "to-photo").symlink_to(root / "a" / "b" / "photo.jpg")
        (root / "a" / "dirlink").symlink_to(root / "a" / "b")
        (root / "statelink").symlink_to(tree["state"] / "sessions")
        for path in (root / "to-outside", root / "to-photo", root / "a" / "dirlink" / "photo.jpg",
                     root / "statelink" / "session-acme" / "store.db"):
            error = refused(path, (root,), tree["state"])
            assert error.reason == "outside", path
            assert "symbolic link" in error.message

    def test_the_root_itself_may_be_a_symlink(self, tree: dict[str, Path], tmp_path: Path) -> None:
        """The sysadmin's path to an allowed directory may hold symlinks; it is named either way."""
        link = tmp_path / "link-to-uploads"
        link.symlink_to(tree["root"])
        assert read(link / "a" / "b" / "photo.jpg", (link,)) == b"photo"
        assert read(tree["root"] / "a" / "b" / "photo.jpg", (link,)) == b"photo"

    def test_dot_and_dotdot_components_are_refused(self, tree: dict[str, Path]) -> None:
        """`.` and `..` are refused outright, not normalised: a path means what it says or nothing."""
        root = tree["root"]
        for path in (f"{root}/a/../a/b/photo.jpg", f"{root}/./a/b/photo.jpg", f"{root}/../outside.txt"):
            assert refused(path, (root,)).reason == "invalid", path

    def test_a_relative_path_or_a_nul_byte_is_invalid(self, tree: dict[str, Path]) -> None:
        """A relative path and a path with a NUL byte are `invalid`, before anything is opened."""
        assert refused("a/b/photo.jpg", (tree["root"],)).reason == "invalid"
        error = refused(f"{tree['root']}/a/b/photo.jpg\0.png", (tree["root"],))
        assert error.reason == "invalid" and "NUL" in error.message

    def test_a_missing_component_is_refused(self, tree: dict[str, Path]) -> None:
        """A directory that does not exist is refused (No such file), never passed on unresolved."""
        error = refused(tree["root"] / "later" / "photo.jpg", (tree["root"],))
        assert error.reason == "unreadable" and "No such file" in error.message

    def test_the_forbidden_directory_is_refused_however_it_is_reached(self, tree: dict[str, Path],
                                                                      tmp_path: Path) -> None:
        """A root that is (or holds, or was swapped for a link to) the state dir yields nothing from it."""
        state = tree["state"]
        assert refused(state / "sessions" / "session-acme" / "store.db", (state,), state).reason == "outside"
        assert refused(state / "sessions" / "session-acme" / "store.db", (tmp_path,), state).reason == "outside"
        swapped = tmp_path / "swapped"
        swapped.symlink_to(state / "sessions")  # e.g. a media dir replaced by someone owning its parent
        assert refused(swapped / "session-acme" / "store.db", (swapped,), state).reason == "outside"
        assert read(tree["root"] / "a" / "b" / "photo.jpg", (tmp_path,), state) == b"photo"


class TestWhatAFileMayBe:
    def test_a_fifo_is_refused_at_once(self, tree: dict[str, Path]) -> None:
        """A FIFO is not a regular file: refused without waiting for a writer."""
        os.mkfifo(tree["root"] / "pipe")
        assert refused(tree["root"] / "pipe", (tree["root"],)).reason == "not_regular"

    def test_a_directory_is_not_a_regular_file(self, tree: dict[str, Path]) -> None:
        """Naming a directory is refused as not a regular file."""
        assert refused(tree["root"] / "a", (tree["root"],)).reason == "not_regular"

    def test_an_empty_file_is_refused(self, tree: dict[str, Path]) -> None:
        """An empty file is refused: there is nothing to send."""
        (tree["root"] / "empty.jpg").write_bytes(b"")
        assert refused(tree["root"] / "empty.jpg", (tree["root"],)).reason == "empty"

    def test_a_file_over_the_limit_is_too_large(self, tree: dict[str, Path]) -> None:
        """A file over the limit is `too_large` before it is read."""
        (tree["root"] / "big.jpg").write_bytes(b"x" * 11)
        assert refused(tree["root"] / "big.jpg", (tree["root"],), limit=10).reason == "too_large"
        assert read(tree["root"] / "big.jpg", (tree["root"],), limit=11) == b"x" * 11


class TestRaces:
    def test_a_directory_swapped_for_a_symlink_never_yields_the_other_file(self, tree: dict[str, Path]) -> None:
        """While a thread swaps a directory for a symlink to the state dir, no read returns the secret."""
        root, state = tree["root"], tree["state"]
        decoy = root / "sub"
        decoy.mkdir()
        (decoy / "store.db").write_bytes(b"decoy")
        stop = threading.Event()

        def swap() -> None:
            while not stop.is_set():
                decoy.rename(root / "sub.real")
                decoy.symlink_to(state / "sessions" / "session-acme")
                decoy.unlink()
                (root / "sub.real").rename(decoy)

        racer = threading.Thread(target=swap)
        racer.start()
        outcomes: dict[str, int] = {}
        try:
            for _ in range(20000):
                try:
                    data = read(decoy / "store.db", (root,))
                except MediaRefused as exc:
                    outcomes[exc.reason] = outcomes.get(exc.reason, 0) + 1
                else:
                    assert data == b"decoy"
                    outcomes["decoy"] = outcomes.get("decoy", 0) + 1
        finally:
            stop.set()
            racer.join()
        assert outcomes.get("decoy") and outcomes.get("outside"), outcomes  # the race was really run
