"""paths.write_text_atomic, the one writer of text reports: unique temp files, nothing partial left."""
from __future__ import annotations

import threading

import pytest

from graphprune.errors import BadInputError
from graphprune.paths import write_text_atomic


def test_two_writers_same_path_leave_one_whole_file(tmp_path):
    out = tmp_path / "report.json"
    texts = ["a" * 200_000 + "\n", "b" * 300_000 + "\n"]
    barrier = threading.Barrier(2)

    def write(t: str) -> None:
        barrier.wait()
        for _ in range(20):
            write_text_atomic(out, t)

    threads = [threading.Thread(target=write, args=(t,)) for t in texts]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert out.read_text() in texts  # one writer's whole text, never a mix or a part
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.json"]  # no temp file left


def test_failed_write_leaves_old_file_and_no_temp(tmp_path):
    out = tmp_path / "report.json"
    out.write_text("old\n")
    with pytest.raises(UnicodeEncodeError):
        write_text_atomic(out, "partial \ud800 text")  # a lone surrogate cannot be encoded: fails mid-write
    assert out.read_text() == "old\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.json"]


def test_failed_write_of_new_file_leaves_nothing(tmp_path):
    out = tmp_path / "new.json"
    with pytest.raises(UnicodeEncodeError):
        write_text_atomic(out, "x" * 10_000 + "\udfff")
    assert list(tmp_path.iterdir()) == []


def test_unwritable_folder_is_one_line_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(BadInputError, match="cannot write"):
        write_text_atomic(blocker / "sub" / "r.json", "{}")
