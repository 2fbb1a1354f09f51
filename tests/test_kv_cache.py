"""The on-disk image-prefix KV store: round trip, LRU by bytes, untrusted entries, concurrent writers."""

import multiprocessing as mp
import os
import struct

import pytest

from llava_edge.runtime.kv_cache import FORMAT_VERSION, MAGIC, KVCache, PrefixKey, positions_digest


def key(image="img0", decoder="dec0", template="vicuna_v1", positions=(1, 2, "img0", 3)):
    return PrefixKey(decoder, template, image, positions_digest(positions))


def blob(n, seed=0):
    return bytes((i * 31 + seed) % 251 for i in range(n))


def test_round_trip_returns_the_bytes_put(tmp_path):
    cache = KVCache(tmp_path)
    payload = blob(10_000)
    assert cache.get(key()) is None
    assert cache.put(key(), payload)
    got = KVCache(tmp_path).get(key())  # a new store on the same directory (a new process)
    assert got == payload
    got[0] ^= 1  # writable (ctypes wraps it), and a private copy: the entry is untouched
    assert KVCache(tmp_path).get(key()) == payload


def test_accepts_a_ctypes_array(tmp_path):
    import ctypes

    raw = (ctypes.c_uint8 * 300).from_buffer_copy(blob(300, seed=5))
    cache = KVCache(tmp_path)
    assert cache.put(key(), raw)
    assert cache.get(key()) == blob(300, seed=5)


@pytest.mark.parametrize("other", [
    key(image="img1"), key(decoder="dec1"), key(template="plain"), key(positions=(1, 2, "img0", 4)),
    PrefixKey("dec0", "vicuna_v1", "img0", positions_digest((1, 2, "img0", 3)), runtime="q8_0"),
])
def test_every_key_field_separates_entries(tmp_path, other):
    cache = KVCache(tmp_path)
    cache.put(key(), blob(100))
    assert cache.get(other) is None


def test_positions_digest_tells_tokens_from_images_and_order():
    assert positions_digest([1, 2, 3]) == positions_digest((1, 2, 3))
    assert positions_digest([1, 2, 3]) != positions_digest([3, 2, 1])
    assert positions_digest([1, "a", 2]) != positions_digest([1, 2, "a"])
    assert positions_digest(["ab"]) != positions_digest(["a", "b"])


def test_lru_eviction_keeps_the_total_under_max_bytes(tmp_path):
    entry = len(open_entry_bytes(tmp_path, 1000))
    cache = KVCache(tmp_path / "c", max_bytes=3 * entry)
    for i in range(3):
        assert cache.put(key(image=f"i{i}"), blob(1000, i))
        os.utime(cache.path(key(image=f"i{i}")), ns=(i * 10**9, i * 10**9))  # distinct access clocks
    assert cache.get(key(image="i0")) is not None  # touch i0: now i1 is the least recently used
    assert cache.put(key(image="i3"), blob(1000, 3))
    assert cache.total_bytes() <= 3 * entry
    assert cache.get(key(image="i1")) is None
    assert [cache.get(key(image=f"i{i}")) is not None for i in (0, 2, 3)] == [True, True, True]
    assert cache.stats.evicted == 1


def test_an_entry_larger_than_the_bound_is_not_stored(tmp_path):
    cache = KVCache(tmp_path, max_bytes=500)
    assert not cache.put(key(), blob(1000))
    assert cache.get(key()) is None and cache.entries() == []


def open_entry_bytes(tmp_path, n):
    probe = KVCache(tmp_path / "probe")
    probe.put(key(image="i0"), blob(n))
    return probe.path(key(image="i0")).read_bytes()


def corrupt_payload(data):
    return data[:-10] + bytes([data[-10] ^ 1]) + data[-9:]


def truncated(data):
    return data[:-1]


def stale_version(data):
    return MAGIC + struct.pack("<I", FORMAT_VERSION - 1) + data[len(MAGIC) + 4:]


def foreign_magic(data):
    return b"NOTKVCAC" + data[8:]


def header_only(data):
    return data[:20]


@pytest.mark.parametrize("damage", [corrupt_payload, truncated, stale_version, foreign_magic, header_only,
                                    lambda d: b"", lambda d: d + b"x"])
def test_a_damaged_entry_is_ignored_deleted_and_replaced(tmp_path, damage):
    cache = KVCache(tmp_path)
    cache.put(key(), blob(2000))
    path = cache.path(key())
    path.write_bytes(damage(path.read_bytes()))
    assert cache.get(key()) is None
    assert not path.exists() and cache.stats.rejected == 1
    assert cache.put(key(), blob(2000, 1))
    assert cache.get(key()) == blob(2000, 1)


def test_an_entry_of_another_key_under_this_name_is_not_trusted(tmp_path):
    cache = KVCache(tmp_path)
    cache.put(key(image="other"), blob(500))
    os.replace(cache.path(key(image="other")), cache.path(key()))  # a valid entry, the wrong key
    assert cache.get(key()) is None
    assert cache.stats.rejected == 1


def _writer(directory, seed, rounds):
    cache = KVCache(directory, max_bytes=1 << 30)
    for _ in range(rounds):
        cache.put(key(), blob(200_000, seed))


@pytest.mark.slow
def test_concurrent_writers_never_leave_a_torn_entry(tmp_path):
    ctx = mp.get_context("spawn")
    writers = [ctx.Process(target=_writer, args=(str(tmp_path), seed, 15)) for seed in range(3)]
    for w in writers:
        w.start()
    cache = KVCache(tmp_path, max_bytes=1 << 30)
    whole = {blob(200_000, seed) for seed in range(3)}
    seen = 0
    while any(w.is_alive() for w in writers) or seen == 0:
        got = cache.get(key())
        if got is not None:
            assert bytes(got) in whole
            seen += 1
    for w in writers:
        w.join()
        assert w.exitcode == 0
    assert cache.stats.rejected == 0
    assert bytes(cache.get(key())) in whole
    assert [p.name for p in tmp_path.iterdir()] == [cache.path(key()).name]  # no temp files left
