"""Shared file-system helpers: atomic writes, safe keys, shard patterns."""

from __future__ import annotations

import os
import stat

import pytest

from t2i_recap.io import UnsafeKeyError, atomic_path, atomic_write_text, check_key, expand_shards, safe_join


def test_atomic_write_leaves_old_file_on_failure(tmp_path):
    target = tmp_path / "out.txt"
    atomic_write_text(target, "old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("crash")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.txt"]  # no temp file left behind
    mode = stat.S_IMODE(os.stat(target).st_mode)
    assert mode & 0o044, f"output is not readable by others: {oct(mode)}"


@pytest.mark.parametrize("key", ["../x", "a/b", "..", ".hidden", "", "a" * 300, "x\x00y", "a\\..\\b"])
def test_unsafe_keys_refused(key, tmp_path):
    with pytest.raises(UnsafeKeyError):
        check_key(key)


def test_safe_join_refuses_escape(tmp_path):
    assert safe_join(tmp_path, "000010001.json").parent == tmp_path.resolve()
    with pytest.raises(UnsafeKeyError):
        safe_join(tmp_path, "../escape.json")


def test_expand_shards_patterns(tmp_path):
    for i in range(3):
        (tmp_path / f"{i:05d}.tar").write_bytes(b"")
    assert len(expand_shards(tmp_path)) == 3
    assert [p.name for p in expand_shards(f"{tmp_path}/{{00000..00001}}.tar")] == ["00000.tar", "00001.tar"]
    assert len(expand_shards(f"{tmp_path}/*.tar")) == 3
    with pytest.raises(FileNotFoundError, match="00006.tar does not exist"):
        expand_shards(f"{tmp_path}/{{00006..00007}}.tar")
