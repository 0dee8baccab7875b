"""Tests for stages.hashing: digests, Merkle root, safe walk, stat cache."""

from __future__ import annotations

import hashlib
import os
import random
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stages.core.errors import InvalidInput, SecurityError
from stages.trust.hashing import FileDigest, StatCache, check_relative_path, hash_files, merkle_leaf, merkle_root, safe_files, sha256_file, verify_files

SMALL_CHUNK = 4096


def _write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# -- sha256_file / hash_files ---------------------------------------------------------------
@pytest.mark.parametrize("size", [0, 1, SMALL_CHUNK - 1, SMALL_CHUNK, SMALL_CHUNK + 1, 5 * SMALL_CHUNK + 17, 3_000_001])
def test_sha256_file_matches_hashlib(tmp_path, size):
    data = random.Random(size).randbytes(size)
    path = _write(tmp_path / "f.bin", data)
    assert sha256_file(path, chunk_size=SMALL_CHUNK) == _sha(data)
    assert sha256_file(path) == _sha(data)


@pytest.mark.skipif(shutil.which("sha256sum") is None, reason="no sha256sum")
def test_sha256_file_matches_sha256sum(tmp_path):
    path = _write(tmp_path / "f.bin", random.Random(1).randbytes(2_500_000))
    out = subprocess.run(["sha256sum", str(path)], check=True, capture_output=True, text=True).stdout
    assert sha256_file(path, chunk_size=1 << 16) == out.split()[0]


def test_sha256_file_rejects_small_chunk(tmp_path):
    with pytest.raises(InvalidInput, match="chunk_size"):
        sha256_file(_write(tmp_path / "f", b"x"), chunk_size=16)


def test_hash_files_order_and_workers_independent(tmp_path):
    rng = random.Random(7)
    paths = [str(_write(tmp_path / f"d{i % 3}" / f"f{i}", rng.randbytes(rng.randrange(0, 50_000)))) for i in range(40)]
    base = hash_files(paths, workers=1)
    for workers in (0, 2, 4):
        shuffled = paths[:]
        rng.shuffle(shuffled)
        assert hash_files(shuffled, workers=workers) == base
    for p in paths:
        data = Path(p).read_bytes()
        assert base[p] == FileDigest(p, _sha(data), len(data))


def test_hash_files_empty_and_bad_workers(tmp_path):
    assert hash_files([]) == {}
    with pytest.raises(InvalidInput, match="workers"):
        hash_files([str(_write(tmp_path / "f", b"x"))], workers=-1)


def test_hash_files_error_propagates(tmp_path):
    paths = [str(_write(tmp_path / f"f{i}", b"abc")) for i in range(10)] + [str(tmp_path / "nope")]
    with pytest.raises(FileNotFoundError):
        hash_files(paths, workers=2)


def test_hashing_refuses_symlink_and_fifo_without_blocking(tmp_path):
    target = _write(tmp_path / "t", b"secret")
    (tmp_path / "link").symlink_to(target)
    with pytest.raises(SecurityError, match="symlink"):
        sha256_file(tmp_path / "link")
    os.mkfifo(tmp_path / "fifo")
    with pytest.raises(SecurityError, match="FIFO"):
        hash_files([str(tmp_path / "fifo")])


# -- Merkle root ----------------------------------------------------------------------------
def _entries(d: dict[str, tuple[str, int]]) -> list[dict]:
    return [{"path": p, "sha256": s, "size": n} for p, (s, n) in d.items()]


def test_merkle_known_answer_and_odd_promotion():
    e = [("a", _sha(b"1"), 1), ("b/c", _sha(b"22"), 2), ("b/d", _sha(b""), 0)]
    leaves = [merkle_leaf(*x) for x in e]
    assert leaves[0] == hashlib.sha256(b"\x00" + (1).to_bytes(8, "big") + b"a" + (1).to_bytes(8, "big")
                                       + bytes.fromhex(e[0][1])).digest()
    left = hashlib.sha256(b"\x01" + leaves[0] + leaves[1]).digest()
    expect = hashlib.sha256(b"\x01" + left + leaves[2]).hexdigest()  # leaves[2] promoted
    assert merkle_root([{"path": p, "sha256": s, "size": n} for p, s, n in reversed(e)]) == expect
    assert merkle_root([(p, s, n) for p, s, n in e]) == expect
    assert merkle_root([FileDigest(p, s, n) for p, s, n in e]) == expect
    assert merkle_root(e[:1]) == leaves[0].hex()
    assert merkle_root([]) == hashlib.sha256(b"\x02").hexdigest()


@pytest.mark.parametrize("bad, match", [
    ({"path": "../x", "sha256": "0" * 64, "size": 1}, "unsafe path"),
    ({"path": "x", "sha256": "0" * 63, "size": 1}, "sha256"),
    ({"path": "x", "sha256": "A" * 64, "size": 1}, "sha256"),
    ({"path": "x", "sha256": "0" * 64, "size": -1}, "size"),
    ({"path": "x", "sha256": "0" * 64, "size": True}, "size"),
])
def test_merkle_rejects_bad_entries(bad, match):
    with pytest.raises((InvalidInput, SecurityError), match=match):
        merkle_root([bad])


def test_merkle_rejects_duplicates():
    with pytest.raises(InvalidInput, match="twice"):
        merkle_root([("a", "0" * 64, 1), ("a", "1" * 64, 1)])


_name = st.text(alphabet="abcxyz._-é", min_size=1, max_size=6).filter(lambda s: s not in (".", ".."))
_path = st.lists(_name, min_size=1, max_size=3).map("/".join)
_digest = st.binary(min_size=32, max_size=32).map(bytes.hex)
_manifest = st.dictionaries(_path, st.tuples(_digest, st.integers(0, 2**40)), min_size=1, max_size=12)


@settings(max_examples=150, deadline=None)
@given(m=_manifest, data=st.data())
def test_merkle_root_detects_any_change(m, data):
    root = merkle_root(_entries(m))
    # order does not matter
    shuffled = data.draw(st.permutations(_entries(m)))
    assert merkle_root(shuffled) == root
    victim = data.draw(st.sampled_from(sorted(m)))
    sha, size = m[victim]
    # edit content
    other = data.draw(_digest.filter(lambda d: d != sha))
    assert merkle_root(_entries({**m, victim: (other, size)})) != root
    # edit size only
    assert merkle_root(_entries({**m, victim: (sha, size + 1)})) != root
    # rename
    new = data.draw(_path.filter(lambda p: p not in m))
    renamed = {(new if p == victim else p): v for p, v in m.items()}
    assert merkle_root(_entries(renamed)) != root
    # add
    assert merkle_root(_entries({**m, new: (sha, size)})) != root
    # remove
    assert merkle_root(_entries({p: v for p, v in m.items() if p != victim})) != root


# -- paths -----------------------------------------------------------------------------------
@pytest.mark.parametrize("rel", ["", "/etc/passwd", "../x", "a/../b", "a/./b", "a//b", "a/", ".", "a\\b",
                                 "a\x00b", "a\nb", "x/\udcff"])
def test_check_relative_path_rejects(rel):
    with pytest.raises(SecurityError, match="unsafe path"):
        check_relative_path(rel)


def test_check_relative_path_accepts():
    assert str(check_relative_path("data/prepared/ab12/X.npy")) == "data/prepared/ab12/X.npy"
    assert str(check_relative_path("..hidden/é")) == "..hidden/é"


def test_safe_files_sorted_regular_files(tmp_path):
    for rel in ["b", "a/z", "a/b/c", "a.txt", "é"]:
        _write(tmp_path / rel, rel.encode())
    got = [str(p.relative_to(tmp_path)) for p in safe_files(tmp_path)]
    assert got == sorted(["b", "a/z", "a/b/c", "a.txt", "é"])


def test_safe_files_rejects_symlink_out(tmp_path):
    outside = _write(tmp_path / "outside" / "secret", b"s")
    data = tmp_path / "data"
    _write(data / "ok", b"1")
    (data / "sneaky").symlink_to(outside)
    with pytest.raises(SecurityError, match="refusing symlink .*sneaky"):
        safe_files(data)
    with pytest.raises(SecurityError, match="leaves data folder"):
        safe_files(data, follow=True)


def test_safe_files_follow_inside_only(tmp_path):
    _write(tmp_path / "real" / "x", b"1")
    (tmp_path / "alias").symlink_to(tmp_path / "real")
    (tmp_path / "loop").symlink_to(tmp_path)
    with pytest.raises(SecurityError, match="symlink"):
        safe_files(tmp_path)
    got = [str(p.relative_to(tmp_path)) for p in safe_files(tmp_path, follow=True)]
    assert got == ["alias/x", "real/x"]  # the loop back to root is visited once, not forever


def test_safe_files_rejects_dir_symlink_out_and_root_symlink(tmp_path):
    _write(tmp_path / "elsewhere" / "f", b"1")
    data = tmp_path / "data"
    data.mkdir()
    (data / "d").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    with pytest.raises(SecurityError, match="leaves data folder"):
        safe_files(data, follow=True)
    (tmp_path / "rootlink").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    with pytest.raises(SecurityError, match="is a symlink"):
        safe_files(tmp_path / "rootlink")


def test_safe_files_rejects_fifo_and_socket(tmp_path):
    os.mkfifo(tmp_path / "pipe")
    with pytest.raises(SecurityError, match="FIFO"):
        safe_files(tmp_path)
    os.unlink(tmp_path / "pipe")
    sock_dir = Path(f"/tmp/mlsec-sock-{os.getpid()}")  # AF_UNIX paths are short
    sock_dir.mkdir(exist_ok=True)
    try:
        s = socket.socket(socket.AF_UNIX)
        s.bind(str(sock_dir / "s"))
        with pytest.raises(SecurityError, match="socket"):
            safe_files(sock_dir)
        s.close()
    finally:
        shutil.rmtree(sock_dir)


def test_safe_files_rejects_unsafe_names_and_missing_root(tmp_path):
    _write(tmp_path / "a\\b", b"1")
    with pytest.raises(SecurityError, match="backslash"):
        safe_files(tmp_path)
    with pytest.raises(InvalidInput, match="does not exist"):
        safe_files(tmp_path / "nope")


# -- stat cache and verify_files ---------------------------------------------------------------
@pytest.fixture
def dataset(tmp_path):
    """A folder of 20 files, old enough (> racy window 0.05 s) to be cacheable."""
    rng = random.Random(3)
    root = tmp_path / "data"
    expected = {}
    for i in range(20):
        data = rng.randbytes(1000 + i)
        _write(root / f"d{i % 2}" / f"f{i:02d}", data)
        expected[f"d{i % 2}/f{i:02d}"] = (_sha(data), len(data))
    time.sleep(0.12)
    return root, expected


def _cache(tmp_path, **kw) -> StatCache:
    return StatCache(tmp_path / "cache" / "stat.json", racy_window_s=0.05, **kw)


def test_verify_cache_skips_unchanged_files(tmp_path, dataset):
    root, expected = dataset
    cache = _cache(tmp_path)
    first = verify_files(root, expected, cache=cache)
    assert (first.ok, first.checked, first.rehashed) == (True, 20, 20)
    second = verify_files(root, expected, cache=cache)
    assert (second.ok, second.checked, second.rehashed) == (True, 20, 0)
    cache.save()
    assert [p.name for p in (tmp_path / "cache").iterdir()] == ["stat.json"]  # no temp file left
    reloaded = _cache(tmp_path)
    assert len(reloaded) == 20
    assert verify_files(root, expected, cache=reloaded).rehashed == 0


def test_verify_catches_edit_with_mtime_restored(tmp_path, dataset):
    root, expected = dataset
    cache = _cache(tmp_path)
    verify_files(root, expected, cache=cache)
    victim = root / "d0" / "f04"
    st = os.stat(victim)
    data = bytearray(victim.read_bytes())
    data[0] ^= 1
    with open(victim, "r+b") as f:  # same inode, same size
        f.write(data)
    os.utime(victim, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert os.stat(victim).st_mtime_ns == st.st_mtime_ns
    result = verify_files(root, expected, cache=cache)
    assert result.rehashed == 1
    assert result.mismatches == (("d0/f04", expected["d0/f04"][0], _sha(bytes(data))),)


def test_verify_catches_same_size_swap(tmp_path, dataset):
    root, expected = dataset
    cache = _cache(tmp_path)
    verify_files(root, expected, cache=cache)
    a, b = root / "d0" / "f00", root / "d0" / "f02"
    _write(a, b"A" * 999), _write(b, b"B" * 999)  # make them the same size first
    expected["d0/f00"] = (_sha(b"A" * 999), 999)
    expected["d0/f02"] = (_sha(b"B" * 999), 999)
    time.sleep(0.12)
    verify_files(root, expected, cache=cache)
    os.rename(a, root / "tmp")
    os.rename(b, a)
    os.rename(root / "tmp", b)
    result = verify_files(root, expected, cache=cache)
    assert [m[0] for m in result.mismatches] == ["d0/f00", "d0/f02"]
    assert result.rehashed == 2


def test_verify_paranoid_rehashes_everything(tmp_path, dataset):
    root, expected = dataset
    cache = _cache(tmp_path)
    verify_files(root, expected, cache=cache)
    result = verify_files(root, expected, cache=cache, paranoid=True)
    assert (result.ok, result.rehashed) == (True, 20)


def test_racily_new_files_are_not_cached(tmp_path):
    data = _write(tmp_path / "data" / "f", b"fresh")
    cache = StatCache(tmp_path / "c.json")  # default window (2 s): the file is too new
    expected = {"f": (_sha(b"fresh"), 5)}
    assert verify_files(data.parent, expected, cache=cache).rehashed == 1
    assert verify_files(data.parent, expected, cache=cache).rehashed == 1
    assert len(cache) == 0


def test_verify_missing_extra_and_cache_lies(tmp_path, dataset):
    root, expected = dataset
    os.unlink(root / "d1" / "f01")
    _write(root / "d1" / "intruder", b"x")
    result = verify_files(root, expected, cache=None, workers=2)
    assert result.mismatches == (("d1/f01", expected["d1/f01"][0], "missing"), ("d1/intruder", "absent", "unexpected file"))
    assert verify_files(root, expected, allow_extra=True).mismatches[0][2] == "missing"


@pytest.mark.parametrize("garbage", [b"", b"{not json", b"[]", b'{"format": "other", "entries": {}}',
                                     b'{"format": "mlsec.statcache/v1", "entries": {"/x": [1, 2, 3, 4, 5, "zz"]}}'])
def test_corrupt_cache_is_empty(tmp_path, dataset, garbage):
    root, expected = dataset
    _write(tmp_path / "cache" / "stat.json", garbage)
    cache = _cache(tmp_path)
    assert len(cache) == 0
    assert verify_files(root, expected, cache=cache).rehashed == 20


def test_cache_path_fifo_or_symlink_is_empty_not_blocking(tmp_path):
    (tmp_path / "cache").mkdir()
    os.mkfifo(tmp_path / "cache" / "stat.json")
    assert len(_cache(tmp_path)) == 0
    os.unlink(tmp_path / "cache" / "stat.json")
    real = _write(tmp_path / "real.json", b'{"format": "mlsec.statcache/v1", "entries": {}}')
    (tmp_path / "cache" / "stat.json").symlink_to(real)
    assert len(_cache(tmp_path)) == 0


def test_mac_cache_ignores_tampering(tmp_path, dataset):
    root, expected = dataset
    cache = _cache(tmp_path, key=b"k" * 32)
    verify_files(root, expected, cache=cache)
    cache.save()
    assert len(_cache(tmp_path, key=b"k" * 32)) == 20
    assert len(_cache(tmp_path, key=b"other")) == 0
    path = tmp_path / "cache" / "stat.json"
    path.write_text(path.read_text().replace(expected["d0/f00"][0], "0" * 64))
    assert len(_cache(tmp_path, key=b"k" * 32)) == 0


def test_verify_rejects_traversal_and_symlinks(tmp_path, dataset):
    root, expected = dataset
    with pytest.raises(SecurityError, match="unsafe path"):
        verify_files(root, {**expected, "../outside": ("0" * 64, 1)})
    victim = root / "d0" / "f00"
    os.unlink(victim)
    victim.symlink_to(tmp_path / "elsewhere")
    with pytest.raises(SecurityError, match="symlink"):
        verify_files(root, expected)
