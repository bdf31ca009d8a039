"""Reference latent import: LMDB and WebDataset round trips, and refusal of pickles that carry code."""

import io
import os
import pickle
import tarfile

import numpy as np
import pytest

from maskdit_ds.data.latent_cache import LatentCache
from maskdit_ds.data.release_import import (LMDBLatents, RefusedPickle, WDSLatents, import_release,
                                              open_release, safe_unpickle)
from repo import tool


def _moments(n, side, seed):
    return np.random.default_rng(seed).standard_normal((n, 8, side, side)).astype(np.float32)


def _make_lmdb(path, z, y):
    lmdb = pytest.importorskip("lmdb")
    env = lmdb.open(str(path), map_size=1 << 26)
    with env.begin(write=True) as txn:
        for i in range(len(z)):
            txn.put(f"z-{i}".encode(), z[i].tobytes())
            txn.put(f"y-{i}".encode(), str(int(y[i])).encode())
        txn.put(b"length", str(len(z)).encode())
    env.close()


def _add(tf, name, data):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tf.addfile(info, io.BytesIO(data))


def _make_tars(folder, z, y):
    """Two shards; .latent pickled with protocols 2, 4 and 5; .cls as text, a pickled int or a numpy int."""
    os.makedirs(folder)
    half = len(z) // 2
    for s, rows in enumerate((range(0, half), range(half, len(z)))):
        with tarfile.open(os.path.join(folder, f"latent-{s:04d}.tar"), "w") as tf:
            for i in rows:
                key = f"{i:08d}"
                _add(tf, f"{key}.latent", pickle.dumps(z[i], protocol=(2, 4, 5)[i % 3]))
                cls = (str(int(y[i])).encode(), pickle.dumps(int(y[i])), pickle.dumps(np.int64(y[i])))[i % 3]
                _add(tf, f"{key}.cls", cls)


def test_lmdb_round_trip(tmp_path):
    z, y = _moments(10, 32, 0), np.arange(10) * 97 % 1000
    _make_lmdb(tmp_path / "ref256", z, y)
    reader = open_release(str(tmp_path / "ref256"))
    assert isinstance(reader, LMDBLatents) and len(reader) == 10 and reader.shape == (8, 32, 32)
    result = import_release(reader, str(tmp_path / "cache"), shard_size=4, progress=False)
    assert result["imported"] == 10
    cache = LatentCache(str(tmp_path / "cache"))
    assert (cache.meta["resolution"], cache.meta["latent_size"], cache.meta["count"]) == (256, 32, 10)
    cache.check_compatible(256, 4)
    for i in range(10):
        np.testing.assert_array_equal(cache[i]["x"].numpy(), z[i])
        assert int(cache[i]["y"]) == y[i]


def test_webdataset_round_trip_via_cli(tmp_path):
    z, y = _moments(7, 8, 1), np.array([3, 999, 0, 12, 500, 7, 1])
    _make_tars(tmp_path / "tars", z, y)
    assert tool("import_latents").main(["--reference", str(tmp_path / "tars"), "--out", str(tmp_path / "cache"),
                      "--shard-size", "3", "--no-progress"]) == 0
    cache = LatentCache(str(tmp_path / "cache"))
    assert (cache.meta["resolution"], len(cache), cache.meta["num_shards"]) == (64, 7, 3)
    for i in range(7):
        np.testing.assert_array_equal(cache[i]["x"].numpy(), z[i])
        assert int(cache[i]["y"]) == y[i]


class _Evil:
    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return (os.system, (f"touch {self.target}",))


def test_numpy1_module_names_load():
    a = np.arange(6, dtype=np.float32).reshape(1, 2, 3)
    old = pickle.dumps(a, protocol=2).replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
    assert b"numpy.core.multiarray\n_reconstruct" in old  # what a numpy 1.x writer produced
    np.testing.assert_array_equal(safe_unpickle(old), a)
    assert safe_unpickle(pickle.dumps(np.float32(2.5))) == np.float32(2.5)


def test_pickle_with_code_is_refused(tmp_path):
    target = tmp_path / "pwned"
    evil = pickle.dumps(_Evil(target))
    with pytest.raises(RefusedPickle, match=r"refusing to unpickle (posix|os)\.system"):
        safe_unpickle(evil, "test")
    assert not target.exists()
    with pytest.raises(RefusedPickle, match="builtins.eval"):
        safe_unpickle(pickle.dumps(eval), "test")  # a bare reference to eval is refused too
    # A tar whose .latent member carries the payload: refused during import, the command never runs.
    z = _moments(2, 8, 2)
    _make_tars(tmp_path / "tars", z, np.array([1, 2]))
    with tarfile.open(tmp_path / "tars" / "latent-0001.tar", "a") as tf:
        _add(tf, "zz-evil.latent", evil)
        _add(tf, "zz-evil.cls", b"5")
    reader = WDSLatents(str(tmp_path / "tars"))
    with pytest.raises(RefusedPickle, match="zz-evil"):
        import_release(reader, str(tmp_path / "cache"), progress=False)
    assert not target.exists()


def test_bad_reference_inputs_are_named(tmp_path):
    os.makedirs(tmp_path / "t")
    with tarfile.open(tmp_path / "t" / "a.tar", "w") as tf:
        _add(tf, "k1.latent", pickle.dumps(np.zeros((8, 4, 4), object)))  # object arrays are not moments
        _add(tf, "k1.cls", b"1")
    with pytest.raises(ValueError, match="k1.*numeric numpy array"):
        WDSLatents(str(tmp_path / "t"))
    with tarfile.open(tmp_path / "t" / "a.tar", "w") as tf:
        _add(tf, "k2.latent", pickle.dumps(np.zeros((8, 4, 4), np.float32)))
    with pytest.raises(ValueError, match="'k2' has members \\['latent'\\], needs both"):
        WDSLatents(str(tmp_path / "t"))
    z, y = _moments(3, 32, 3), np.array([1, 2, 3])
    _make_lmdb(tmp_path / "l", z, y)
    with pytest.raises(ValueError, match="32x32, which is 256 px"):
        import_release(LMDBLatents(str(tmp_path / "l")), str(tmp_path / "c"), resolution=512, progress=False)
