"""sstmerge.io's content hashes: what changes them and what does not."""

from __future__ import annotations

import hashlib

from sstmerge.io import file_sha256, manifest, path_sha256


def test_file_sha256_is_the_bytes_hash(tmp_path):
    f = tmp_path / "a.bin"
    data = bytes(range(256)) * 5000  # more than one read chunk (1 MiB)
    f.write_bytes(data)
    assert file_sha256(f) == hashlib.sha256(data).hexdigest()


def test_path_sha256_sees_names_contents_and_nesting(tmp_path):
    d = tmp_path / "adapter"
    (d / "sub").mkdir(parents=True)
    (d / "a.json").write_text("{}")
    (d / "sub" / "w.bin").write_bytes(b"\x00\x01")
    h = path_sha256(d)
    assert path_sha256(d) == h  # deterministic
    (d / "sub" / "w.bin").write_bytes(b"\x00\x02")
    h2 = path_sha256(d)
    assert h2 != h  # an edited file
    (d / "sub" / "w.bin").rename(d / "sub" / "v.bin")
    assert path_sha256(d) != h2  # a renamed file, same bytes
    # a file hashes its name with its bytes; the same bytes under another name differ
    (tmp_path / "x.csv").write_text("goal\n")
    (tmp_path / "y.csv").write_text("goal\n")
    assert path_sha256(tmp_path / "x.csv") != path_sha256(tmp_path / "y.csv")
    assert file_sha256(tmp_path / "x.csv") == file_sha256(tmp_path / "y.csv")


def test_manifest_skips_itself(tmp_path):
    (tmp_path / "a.txt").write_text("a")
    (tmp_path / "manifest.json").write_text("{}")
    assert manifest(tmp_path) == {"a.txt": file_sha256(tmp_path / "a.txt")}
