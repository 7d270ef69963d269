"""Tests for sparsecore.apps.data: IDX/.mat/CSV readers, splits, normalisation, the built-in set, batches."""
import gzip
import math
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from sparsecore.apps import data as D
from sparsecore.apps.data import batches, load_dataset, read_idx, stratified_split, write_idx

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


# ----------------------------------------------------------------------------------------------- IDX files


def _raw_idx(code: int, shape, payload: bytes) -> bytes:
    return bytes([0, 0, code, len(shape)]) + np.asarray(shape, dtype=">u4").tobytes() + payload


@pytest.mark.parametrize("compress", [False, True])
@pytest.mark.parametrize("dtype", [np.uint8, np.int8, np.int16, np.int32, np.float32, np.float64])
def test_idx_round_trip(tmp_path, compress, dtype):
    rng = np.random.default_rng(0)
    a = (rng.random((5, 4, 3)) * 100).astype(dtype)
    # the file name says the opposite of the content: compression must be detected from the bytes
    p = tmp_path / ("images.idx" if compress else "images.idx.gz")
    write_idx(p, a, compress=compress)
    assert (p.read_bytes()[:2] == b"\x1f\x8b") == compress
    b = read_idx(p)
    assert b.shape == a.shape and b.dtype == np.dtype(dtype).newbyteorder("=")
    np.testing.assert_array_equal(a, b)
    assert b.flags.writeable


def test_idx_hand_made_header(tmp_path):
    # a big-endian int16 file written by hand, as the format spec describes it
    vals = np.array([[1, -2, 300], [4, 5, -32768]], dtype=">i2")
    p = tmp_path / "x"
    p.write_bytes(_raw_idx(0x0B, (2, 3), vals.tobytes()))
    np.testing.assert_array_equal(read_idx(p), vals.astype(np.int16))
    p.write_bytes(gzip.compress(_raw_idx(0x08, (4,), bytes([0, 1, 2, 255]))))
    np.testing.assert_array_equal(read_idx(p), [0, 1, 2, 255])


def test_idx_truncated_and_malformed(tmp_path):
    good = _raw_idx(0x08, (3, 2, 2), bytes(range(12)))
    cases = {
        "truncated_data": (good[:-1], "truncated IDX file"),
        "trailing": (good + b"\x00\x00", "trailing"),
        "bad_magic": (b"\x12\x34" + good[2:], "bad magic number"),
        "bad_dtype": (good[:2] + b"\x07" + good[3:], "dtype code"),
        "short": (b"\x00\x00", "too short"),
        "header_cut": (good[:9], "truncated IDX header"),
        "zero_dims": (b"\x00\x00\x08\x00", "0 dimensions"),
        "empty": (b"", "too short"),
    }
    for name, (content, msg) in cases.items():
        p = tmp_path / name
        p.write_bytes(content)
        with pytest.raises(ValueError, match=msg) as e:
            read_idx(p)
        assert str(p) in str(e.value), name
    # gzip: truncated stream, and a corrupt one
    gz = gzip.compress(good)
    p = tmp_path / "cut.gz"
    p.write_bytes(gz[: len(gz) // 2])
    with pytest.raises(ValueError, match="gzip") as e:
        read_idx(p)
    assert str(p) in str(e.value)
    p = tmp_path / "corrupt.gz"
    p.write_bytes(gz[:12] + bytes(b ^ 0xFF for b in gz[12:]))
    with pytest.raises(ValueError, match="gzip"):
        read_idx(p)
    # a truncated file inside a valid gzip stream is still caught by the length check
    p = tmp_path / "inner.gz"
    p.write_bytes(gzip.compress(good[:-3]))
    with pytest.raises(ValueError, match="truncated IDX file"):
        read_idx(p)


def test_idx_missing_file(tmp_path):
    p = tmp_path / "nope-idx3-ubyte"
    with pytest.raises(FileNotFoundError, match="nope-idx3-ubyte"):
        read_idx(p)


# ----------------------------------------------------------------------------------------------- IDX datasets


def _write_mnist_like(folder: Path, n_train=200, n_test=50, h=8, w=6, gz=(True, False, True, False), seed=0):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    ytr = np.arange(n_train, dtype=np.uint8) % 10
    yte = np.arange(n_test, dtype=np.uint8) % 10
    xtr = rng.integers(0, 256, (n_train, h, w), dtype=np.uint8)
    xte = rng.integers(0, 256, (n_test, h, w), dtype=np.uint8)
    arrays = [xtr, ytr, xte, yte]
    for (stem, a, z) in zip(D._IDX_FILES.values(), arrays, gz):
        write_idx(folder / (stem + (".gz" if z else "")), a)
    return arrays


def test_mnist_like_dataset(tmp_path):
    xtr, ytr, xte, yte = _write_mnist_like(tmp_path / "mnist")
    for where in (tmp_path, tmp_path / "mnist"):  # the folder itself or its parent with a "mnist" sub-folder
        ds = load_dataset("mnist", where, val_fraction=0.1, seed=3, normalize="none")
        assert (ds.n_train, ds.n_val, ds.n_test) == (180, 20, 50)
        assert ds.input_shape == (8, 6, 1) and ds.n_features == 48 and ds.n_classes == 10
        assert ds.x_train.dtype == torch.float32 and ds.y_train.dtype == torch.int64
        assert ds.x_train.shape == (180, 48) and ds.x_val.shape == (20, 48) and ds.x_test.shape == (50, 48)
        # test set kept as is, in order, scaled by 1/255
        np.testing.assert_allclose(ds.x_test.numpy(), xte.reshape(50, -1) / 255.0, rtol=1e-6)
        np.testing.assert_array_equal(ds.y_test.numpy(), yte)
        # train + val is exactly the training file
        both = torch.cat([ds.x_train, ds.x_val]).numpy()
        got = sorted(map(bytes, (both * 255).round().astype(np.uint8)))
        assert got == sorted(map(bytes, xtr.reshape(200, -1)))
        assert ds.split_info["n_val"] == 20 and ds.split_info["test_split"].startswith("fixed")
        assert ds.y_val.bincount(minlength=10).tolist() == [2] * 10
        assert "mnist" in repr(ds) and "train=180" in repr(ds)


def test_idx_dataset_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError) as e:
        load_dataset("fashion-mnist", tmp_path)
    msg = str(e.value)
    for stem in D._IDX_FILES.values():
        assert stem in msg
    assert str(tmp_path) in msg
    # three of the four present: the missing one is named
    _write_mnist_like(tmp_path / "fm")
    (tmp_path / "fm" / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(FileNotFoundError, match="missing t10k-labels-idx1-ubyte"):
        load_dataset("fashion-mnist", tmp_path / "fm")


def test_idx_dataset_inconsistent(tmp_path):
    _write_mnist_like(tmp_path)
    write_idx(tmp_path / "train-labels-idx1-ubyte", np.zeros(199, np.uint8))  # one label short
    with pytest.raises(ValueError, match="200 images .* 199 labels"):
        load_dataset("mnist", tmp_path)


# ----------------------------------------------------------------------------------------------- splits


def test_stratified_split_sizes_and_strata():
    y = np.repeat(np.arange(4), [50, 30, 15, 5])  # 100 samples, unbalanced
    keep, held = stratified_split(y, 0.2, seed=1)
    assert len(held) == 20 and len(keep) == 80
    assert np.intersect1d(keep, held).size == 0 and np.union1d(keep, held).size == 100
    assert np.bincount(y[held], minlength=4).tolist() == [10, 6, 3, 1]
    assert np.all(np.diff(keep) > 0) and np.all(np.diff(held) > 0)
    # exact total by largest remainders even when no class quota is whole
    y = np.repeat(np.arange(3), [7, 7, 7])
    _, held = stratified_split(y, 0.5, seed=0)
    assert len(held) == 11 and sorted(np.bincount(y[held]).tolist()) == [3, 4, 4]
    # determinism by seed, variation across seeds, and the independent streams
    y = np.arange(1000) % 10
    a = stratified_split(y, 0.1, seed=5)[1]
    assert np.array_equal(a, stratified_split(y, 0.1, seed=5)[1])
    assert not np.array_equal(a, stratified_split(y, 0.1, seed=6)[1])
    assert not np.array_equal(a, stratified_split(y, 0.1, seed=5, stream=1)[1])
    keep, held = stratified_split(y, 0.0)
    assert len(held) == 0 and len(keep) == 1000
    for bad in (-0.1, 1.0, 1.5):
        with pytest.raises(ValueError, match="fraction"):
            stratified_split(y, bad)


def test_split_determinism_and_val_zero():
    a = load_dataset("builtin", seed=1)
    b = load_dataset("builtin", seed=1)
    c = load_dataset("builtin", seed=2)
    assert torch.equal(a.x_val, b.x_val) and torch.equal(a.y_train, b.y_train)
    assert not torch.equal(a.x_val, c.x_val)
    z = load_dataset("builtin", val_fraction=0)
    assert z.x_val.shape == (0, 256) and z.y_val.shape == (0,) and z.x_val.dtype == torch.float32
    assert z.y_val.dtype == torch.int64 and z.n_train == 4000
    assert z.split_info["val_class_counts"] == [0] * 10
    with pytest.raises(ValueError, match="val_fraction"):
        load_dataset("builtin", val_fraction=1.0)


# ----------------------------------------------------------------------------------------------- .mat


def _tabular(n=100, f=6, seed=0):
    rng = np.random.default_rng(seed)
    y = np.repeat([1, 2, 3], [50, 30, 20])  # 1-based labels, as in scikit-feature
    x = rng.normal(size=(n, f)) * np.arange(1, f + 1) + 10 * y[:, None]
    x[:, 2] = 7.0  # a constant feature
    return x, y


def test_mat_round_trip(tmp_path):
    sio = pytest.importorskip("scipy.io")
    x, y = _tabular()
    sio.savemat(tmp_path / "Toy.mat", {"X": x, "Y": y.reshape(-1, 1).astype(np.uint8)})
    ds = load_dataset(f"mat:{tmp_path / 'Toy.mat'}", seed=0, normalize="none")
    assert (ds.n_train, ds.n_val, ds.n_test) == (72, 8, 20)
    assert ds.classes == (1, 2, 3) and ds.n_classes == 3 and ds.input_shape == (6,) and ds.name == "mat:Toy"
    assert ds.y_test.bincount(minlength=3).tolist() == [10, 6, 4]
    for xs, ys in ((ds.x_train, ds.y_train), (ds.x_val, ds.y_val), (ds.x_test, ds.y_test)):
        assert ys.min() >= 0 and ys.max() <= 2
        # every row maps back to its own label: label k+1 in the file is k here
        rows = {tuple(np.round(r, 4)): lab for r, lab in zip(x.astype(np.float32), y)}
        for r, lab in zip(xs.numpy(), ys.tolist()):
            assert rows[tuple(np.round(r, 4))] == lab + 1
    # bare name in data_dir, case-insensitive; a .mat path as the name; input_shape override
    ds2 = load_dataset("mat:toy", tmp_path, seed=0, normalize="none")
    assert torch.equal(ds2.x_test, ds.x_test)
    ds3 = load_dataset(str(tmp_path / "Toy.mat"), input_shape=(3, 2, 1))
    assert ds3.input_shape == (3, 2, 1)
    assert ds3.split_info["test_fraction"] == 0.2 and ds3.split_info["normalization"]["kind"] == "feature"
    ds4 = load_dataset(tmp_path / "Toy.mat", test_fraction=0.5, val_fraction=0)
    assert (ds4.n_train, ds4.n_val, ds4.n_test) == (50, 0, 50)
    with pytest.raises(ValueError, match="input_shape"):
        load_dataset(tmp_path / "Toy.mat", input_shape=(5,))


def test_mat_errors(tmp_path):
    sio = pytest.importorskip("scipy.io")
    sio.savemat(tmp_path / "nokey.mat", {"data": np.zeros((3, 2)), "Y": np.ones((3, 1))})
    with pytest.raises(ValueError, match="no variable 'X'.*data"):
        load_dataset(tmp_path / "nokey.mat")
    (tmp_path / "junk.mat").write_bytes(b"this is not a mat file" * 10)
    with pytest.raises(ValueError, match="junk.mat"):
        load_dataset(tmp_path / "junk.mat")
    with pytest.raises(FileNotFoundError, match="nokey.mat") as e:  # lists what is there
        load_dataset("mat:missing", tmp_path)
    assert "missing.mat" in str(e.value)
    x = np.ones((4, 2))
    x[1, 1] = np.nan
    sio.savemat(tmp_path / "nan.mat", {"X": x, "Y": np.array([[1], [2], [1], [2]])})
    with pytest.raises(ValueError, match="non-finite"):
        load_dataset(tmp_path / "nan.mat")


# ----------------------------------------------------------------------------------------------- CSV


def test_csv(tmp_path):
    x, y = _tabular()
    names = np.array(["cat", "dog", "eel"])[y - 1]
    p = tmp_path / "t.csv"
    lines = ["f0,f1,f2,f3,f4,f5,label"] + [",".join(f"{v:.6g}" for v in r) + f",{s}" for r, s in zip(x, names)]
    p.write_text("\n".join(lines) + "\n\n")
    ds = load_dataset(f"csv:{p}", normalize="none")
    assert ds.classes == ("cat", "dog", "eel") and ds.n_features == 6 and ds.name == "csv:t"
    assert ds.split_info["csv_header"] is True and (ds.n_train + ds.n_val + ds.n_test) == 100
    # no header, numeric label in the first column, semicolons
    q = tmp_path / "u.csv"
    q.write_text("\n".join(f"{lab};" + ";".join(f"{v:.6g}" for v in r) for r, lab in zip(x, y)))
    ds2 = load_dataset(q, label_column=0, delimiter=";", normalize="none")
    assert ds2.classes == (1, 2, 3) and ds2.split_info["csv_header"] is False
    assert torch.allclose(ds2.x_test, ds.x_test, atol=1e-4) and torch.equal(ds2.y_test, ds.y_test)
    ds3 = load_dataset(p, label_column="label")
    assert torch.equal(ds3.y_train, ds.y_train)
    # errors name the line
    bad = tmp_path / "bad.csv"
    bad.write_text("1,2,0\n3,,1\n")
    with pytest.raises(ValueError, match="line 2, column 2"):
        load_dataset(bad, header=False)
    bad.write_text("1,2,0\n3,4\n")
    with pytest.raises(ValueError, match="line 2 has 2 fields"):
        load_dataset(bad)
    with pytest.raises(FileNotFoundError, match="nothere.csv"):
        load_dataset("csv:nothere.csv", tmp_path)


# ----------------------------------------------------------------------------------------------- normalisation


def test_normalisation_uses_training_statistics_only(tmp_path):
    sio = pytest.importorskip("scipy.io")
    x, y = _tabular(seed=1)
    sio.savemat(tmp_path / "n.mat", {"X": x, "Y": y.reshape(-1, 1)})
    raw = load_dataset(tmp_path / "n.mat", seed=4, normalize="none")
    ds = load_dataset(tmp_path / "n.mat", seed=4)
    tr = raw.x_train.double()
    mean, std = tr.mean(0), tr.std(0, unbiased=False)
    std[2] = 1.0  # the constant feature
    assert torch.allclose(ds.mean.double(), mean, atol=1e-5) and torch.allclose(ds.std.double(), std, rtol=1e-5)
    for a, b in ((ds.x_train, raw.x_train), (ds.x_val, raw.x_val), (ds.x_test, raw.x_test)):
        assert torch.allclose(a.double(), (b.double() - mean) / std, atol=1e-4)
        assert torch.isfinite(a).all()
    assert torch.all(ds.x_test[:, 2] == 0) and ds.split_info["normalization"]["n_constant_features"] == 1
    assert torch.allclose(ds.x_train.double().mean(0), torch.zeros(6, dtype=torch.float64), atol=1e-5)
    # statistics of train+val or of test would differ: the test set is not standardised to mean 0
    assert ds.x_test.mean(0).abs().max() > 1e-3
    # global mode for images: one scalar mean/std from the training part
    img = load_dataset("builtin", seed=0)
    rawi = load_dataset("builtin", seed=0, normalize="none")
    m, s = rawi.x_train.double().mean(), rawi.x_train.double().std(unbiased=False)
    info = img.split_info["normalization"]
    assert info["kind"] == "global" and math.isclose(info["mean"], m.item(), rel_tol=1e-6)
    assert math.isclose(info["std"], s.item(), rel_tol=1e-6)
    assert torch.allclose(img.x_test.double(), (rawi.x_test.double() - m) / s, atol=1e-5)
    feat = load_dataset("builtin", normalize="feature")  # a border pixel may be constant: no NaN anywhere
    assert all(torch.isfinite(t).all() for t in (feat.x_train, feat.x_val, feat.x_test))
    with pytest.raises(ValueError, match="normalize"):
        load_dataset("builtin", normalize="zscore")
    mm = load_dataset("builtin", normalize="minmax")  # per feature to [0, 1] on the training part
    assert mm.x_train.min() == 0.0 and mm.x_train.max() == 1.0 and mm.split_info["normalization"]["kind"] == "minmax"
    assert torch.equal(mm.x_train.amax(0) == 1.0, rawi.x_train.amax(0) > rawi.x_train.amin(0))  # constant: 0


def test_constant_features_global_and_all_constant(tmp_path):
    sio = pytest.importorskip("scipy.io")
    sio.savemat(tmp_path / "c.mat", {"X": np.full((20, 3), 5.0), "Y": np.arange(20).reshape(-1, 1) % 2})
    for kind in ("feature", "global"):
        ds = load_dataset(tmp_path / "c.mat", normalize=kind)
        assert torch.all(ds.x_train == 0) and torch.all(ds.x_test == 0)


# ----------------------------------------------------------------------------------------------- built-in


def test_builtin():
    assert D.BUILTIN_PATH.is_file() and D.BUILTIN_PATH.stat().st_size < 500_000
    ds = load_dataset("builtin")
    assert (ds.n_train, ds.n_val, ds.n_test) == (3600, 400, 1000)
    assert ds.input_shape == (16, 16, 1) and ds.n_features == 256 and ds.n_classes == 10
    assert ds.classes == D.BUILTIN_CLASSES and ds.name == "builtin"
    assert ds.x_train.dtype == torch.float32 and ds.y_test.dtype == torch.int64
    assert ds.y_train.bincount().tolist() == [360] * 10 and ds.y_test.bincount().tolist() == [100] * 10
    raw = load_dataset("builtin", normalize="none")
    assert raw.x_train.min() >= 0 and raw.x_train.max() <= 1
    levels = torch.unique((raw.x_train * 255).round())
    assert len(levels) <= 16


def test_builtin_regenerates_the_bundled_file(tmp_path):
    fresh = D.make_builtin()
    with np.load(D.BUILTIN_PATH) as z:
        for k, v in fresh.items():
            assert z[k].shape == v.shape and z[k].dtype == v.dtype
            diff = z[k].astype(int) - v.astype(int)
            # exact on this machine; allow rare one-level rounding differences from another libm
            assert (diff != 0).mean() < 1e-4 and np.abs(diff).max() <= 17, k
        assert tuple(z["class_names"]) == D.BUILTIN_CLASSES
    out = D.write_builtin(tmp_path / "s.npz", n_train=20, n_test=10)
    with np.load(out) as z:
        assert z["x_train"].shape == (20, 16, 16) and z["y_test"].shape == (10,)


def test_builtin_is_learnable_not_trivial():
    """Class means separate the classes well above chance but far from perfectly (nearest class mean)."""
    ds = load_dataset("builtin")
    means = torch.stack([ds.x_train[ds.y_train == c].mean(0) for c in range(10)])
    acc = (torch.cdist(ds.x_test, means).argmin(1) == ds.y_test).float().mean().item()
    assert 0.25 < acc < 0.9


# ----------------------------------------------------------------------------------------------- batches


def test_batches():
    x = torch.arange(23, dtype=torch.float32).unsqueeze(1).repeat(1, 2)
    y = torch.arange(23)
    b = batches(x, y, 5, shuffle=False)
    assert len(b) == 5
    out = list(b)
    assert [len(yb) for _, yb in out] == [5, 5, 5, 5, 3]
    assert torch.equal(torch.cat([yb for _, yb in out]), y)
    assert len(batches(x, y, 5, shuffle=False, drop_last=True)) == 4
    assert sum(len(yb) for _, yb in batches(x, y, 5, False, drop_last=True)) == 20

    def order(seed):
        g = torch.Generator().manual_seed(seed)
        it = batches(x, y, 4, shuffle=True, generator=g)
        return [torch.cat([yb for _, yb in it]) for _ in range(2)]  # two epochs from one object

    e1, e2 = order(0)
    assert sorted(e1.tolist()) == list(range(23)) and not torch.equal(e1, e2)
    r1, r2 = order(0)
    assert torch.equal(e1, r1) and torch.equal(e2, r2)
    assert not torch.equal(order(1)[0], e1)
    for xb, yb in batches(x, y, 4, True, torch.Generator().manual_seed(0)):
        assert torch.equal(xb[:, 0], yb.float())  # rows stay paired with their labels
    with pytest.raises(ValueError, match="batch_size"):
        batches(x, y, 0)
    with pytest.raises(ValueError, match="rows"):
        batches(x, y[:5], 2)


def test_unknown_name():
    with pytest.raises(ValueError, match="unknown dataset"):
        load_dataset("cifar-10")


def test_dataset_to_device():
    ds = load_dataset("builtin", val_fraction=0.05).to("cpu")
    assert ds.x_train.device.type == "cpu" and ds.n_val == 200 and ds.mean.shape == (256,)


# ----------------------------------------------------------------------------------------------- real data


@pytest.mark.skipif(not (SHARED_DATA / "fashion-mnist").is_dir(), reason="shared/data/fashion-mnist absent")
def test_real_fashion_mnist():
    t = time.perf_counter()
    ds = load_dataset("fashion-mnist", SHARED_DATA / "fashion-mnist")
    elapsed = time.perf_counter() - t
    assert elapsed < 10, elapsed
    assert (ds.n_train, ds.n_val, ds.n_test) == (54000, 6000, 10000)
    assert ds.input_shape == (28, 28, 1) and ds.n_features == 784 and ds.n_classes == 10
    assert ds.classes[0] == "T-shirt/top"
    assert ds.y_val.bincount().tolist() == [600] * 10 and ds.y_test.bincount().tolist() == [1000] * 10
    # pixel mean before normalisation: the documented 0.2860 over all 60,000 training images
    info = ds.split_info["normalization"]
    assert info["kind"] == "global" and abs(info["mean"] - 0.2860) < 2e-3 and abs(info["std"] - 0.3530) < 2e-3
    # undo the normalisation on train + val (= the training file): sum(x * std + mean) / count
    raw_sum = sum(x.sum(dtype=torch.float64).item() * info["std"] + x.numel() * info["mean"]
                  for x in (ds.x_train, ds.x_val))
    assert abs(raw_sum / (60000 * 784) - 0.2860) < 5e-4
    assert abs(ds.x_train.mean().item()) < 1e-4 and abs(ds.x_train.std().item() - 1) < 1e-3
