"""Loading: damaged or foreign state dicts never crash and never change a layer half-way; checkpoints are verified;
the training command checks its outputs before it trains.

The damage tests run in a subprocess: a load that trusted a bad index would segfault in the next backward, and
that must fail this test, not kill the test session.
"""
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from sparsecore import SparseLinear, reset_optimizer_state
from sparsecore.apps.train import CHECKPOINT_NAME, TrainConfig, TrainError, load_checkpoint, main, train

ROOT = Path(__file__).resolve().parents[1]


def run_python(code: str, timeout: int = 120) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


_DAMAGE = r'''
import copy, torch
from sparsecore import SparseLinear

def fresh(layout):
    g = torch.Generator().manual_seed(0)
    kw = dict(layout="bsr", block_size=2) if layout == "bsr" else {}
    return SparseLinear(12, 10, density=0.4, generator=g, **kw)

def damaged(sd, name, how):
    t = sd[name].clone()
    if how == "swap" and t.numel() >= 2:          # values stay in range: the worst case for a trusting loader
        i, j = 0, t.numel() - 1
        while j > 0 and t.view(-1)[j] == t.view(-1)[i]:
            j -= 1
        t.view(-1)[i], t.view(-1)[j] = t.view(-1)[j].clone(), t.view(-1)[i].clone()
    elif how == "big":
        t.view(-1)[t.numel() // 2] = 32767 if t.dtype == torch.int16 else 10**6  # int16: a compact pattern
    elif how == "negative":
        t.view(-1)[0] = -1
    elif how == "short":
        t = t[:-1].clone()
    elif how == "float":
        t = t.float()
    sd[name] = t
    return sd

checked = 0
for layout in ("csr", "bsr"):
    for name in ("rowptr", "col", "colptr", "row", "perm", "_extra_state"):
        for how in ("swap", "big", "negative", "short", "float"):
            layer = fresh(layout)
            sd = damaged(copy.deepcopy(fresh(layout).state_dict()), name, how)
            if all(torch.equal(sd[k], v) for k, v in fresh(layout).state_dict().items()):
                continue  # this damage happens to change nothing (e.g. swapping equal entries)
            before = copy.deepcopy(layer.state_dict())
            try:
                layer.load_state_dict(sd)
            except RuntimeError as e:
                assert "left unchanged" in str(e), (layout, name, how, str(e))
            else:
                raise AssertionError(f"damaged {name} ({how}, {layout}) was accepted")
            after = layer.state_dict()
            assert all(torch.equal(before[k], after[k]) for k in before), (layout, name, how)
            x = torch.randn(3, 12, requires_grad=True)
            layer(x).sum().backward()  # still a working layer
            checked += 1
print("checked", checked)
'''


def test_damaged_state_dicts_are_refused_and_change_nothing():
    r = run_python(_DAMAGE)
    assert r.returncode == 0, r.stderr[-3000:]
    assert int(r.stdout.split()[-1]) >= 50


def test_state_dict_of_another_shape_is_a_clear_error(gen):
    a = SparseLinear(16, 8, density=0.5, generator=gen)
    for other in (SparseLinear(20, 8, density=0.5, generator=gen), SparseLinear(16, 9, density=0.5, generator=gen),
                  SparseLinear(16, 8, density=0.5, layout="bsr", block_size=4, generator=gen)):
        before = {k: v.clone() for k, v in a.state_dict().items()}
        with pytest.raises(RuntimeError, match="size mismatch"):
            a.load_state_dict(other.state_dict())
        assert all(torch.equal(before[k], v) for k, v in a.state_dict().items())


def test_every_state_dict_entry_is_a_tensor(gen):
    """safetensors, checkpoint averaging and `{k: v.to(dev)}` loops need it."""
    sd = SparseLinear(6, 5, density=0.5, generator=gen).state_dict()
    assert all(isinstance(v, torch.Tensor) for v in sd.values()) and "_extra_state" in sd


def test_state_dict_without_the_shape_record_still_loads(gen):
    a, b = SparseLinear(16, 8, density=0.3, generator=gen), SparseLinear(16, 8, density=0.6, generator=gen)
    sd = a.state_dict()
    del sd["_extra_state"]  # as written before the record existed
    b.load_state_dict(sd)
    x = torch.randn(2, 16)
    assert torch.equal(a(x), b(x))


def test_nn_linear_state_dict_loads_at_the_pattern(gen):
    lin = nn.Linear(10, 6)
    layer = SparseLinear(10, 6, density=0.3, generator=gen)
    with pytest.warns(UserWarning, match="kept 18 of 60 weights"):
        layer.load_state_dict(lin.state_dict())
    assert torch.equal(layer.values.detach(), layer.pattern.gather(lin.weight.detach()))
    assert torch.equal(layer.bias.detach(), lin.bias.detach())
    with pytest.raises(RuntimeError, match="size mismatch for weight"):
        layer.load_state_dict(nn.Linear(11, 6).state_dict())
    with pytest.raises(RuntimeError, match="bias=False"):
        SparseLinear(10, 6, bias=False, density=0.3).load_state_dict(lin.state_dict())


def test_load_of_another_nnz_and_the_optimizer(gen):
    model = nn.Sequential(SparseLinear(12, 8, density=0.2, generator=gen))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x = torch.randn(4, 12)
    model(x).sum().backward()
    opt.step()
    values = model[0].values
    model.load_state_dict(nn.Sequential(SparseLinear(12, 8, density=0.6, generator=gen)).state_dict())
    assert model[0].values is values and values.grad is None  # the optimizer still holds this Parameter
    model(x).sum().backward()
    with pytest.raises(RuntimeError):  # old momentum, old size: a loud failure, never a silent one
        opt.step()
    assert reset_optimizer_state(opt, model) == 1
    before = values.detach().clone()
    opt.step()
    assert not torch.equal(before, values.detach())


def test_load_with_assign_takes_the_checkpoint_tensors(gen):
    src = SparseLinear(8, 4, density=0.5, generator=gen, dtype=torch.float64)
    dst = SparseLinear(8, 4, density=0.25, generator=gen)
    dst.load_state_dict(src.state_dict(), assign=True)
    assert dst.values.dtype == torch.float64 and dst.pattern == src.pattern
    x = torch.randn(2, 8, dtype=torch.float64)
    assert torch.equal(dst(x), src(x))


# ----------------------------------------------------------------------------------------------- checkpoints
def _config(tmp_path, **kw):
    base = dict(method="set", dataset="builtin", hidden=(24, 24), batch_size=200, threads=1, lr=0.05, epochs=2,
                quiet=True, epsilon=3.0, checkpoint=str(tmp_path / "ck"))
    base.update(kw)
    return TrainConfig(**base)


def test_flipped_bit_in_a_stored_weight_is_a_one_line_error(tmp_path, capsys):
    train(_config(tmp_path, epochs=1))
    path = tmp_path / "ck" / CHECKPOINT_NAME
    ck = load_checkpoint(path)
    weight = ck["model"]["2.values"].numpy().tobytes()  # the second layer's values
    raw = bytearray(path.read_bytes())
    at = bytes(raw).find(weight[:64])
    assert at > 0
    raw[at + 10] ^= 0x04
    path.write_bytes(bytes(raw))
    with pytest.raises(TrainError, match=r"damaged.*model\.2\.values"):
        load_checkpoint(path)
    rc = main(["--method", "set", "--epochs", "2", "--dataset", "builtin", "--hidden", "24,24", "--batch-size", "200",
               "--threads", "1", "--lr", "0.05", "--epsilon", "3", "--checkpoint", str(tmp_path / "ck"), "--resume"])
    err = capsys.readouterr().err
    assert rc == 2 and "damaged" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_unwritable_outputs_fail_before_training(tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    for extra in (["--checkpoint", str(blocker / "sub")], ["--json", str(blocker / "r.json")],
                  ["--json", str(tmp_path)]):
        rc = main(["--method", "static", "--epochs", "1", "--dataset", "builtin", "--hidden", "8", "--threads", "1",
                   *extra])
        out = capsys.readouterr()
        assert rc == 2 and "cannot write" in out.err and "epoch 1/1" not in out.err, out.err


def test_stale_temporary_files_are_removed(tmp_path):
    folder = tmp_path / "ck"
    folder.mkdir()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = folder / f".{CHECKPOINT_NAME}.tmp-{int(dead.stdout)}"
    stale.write_bytes(b"half a checkpoint")
    json_stale = tmp_path / f".r.json.tmp-{int(dead.stdout)}"
    json_stale.write_text("{")
    train(_config(tmp_path, epochs=1, json=str(tmp_path / "r.json")))
    assert not stale.exists() and not json_stale.exists()
    assert json.loads((tmp_path / "r.json").read_text())["epochs"] == 1


def test_load_dataset_rejects_non_finite_idx_features(tmp_path):
    from sparsecore.apps.data import load_dataset, write_idx

    x = np.random.default_rng(0).random((20, 4, 4)).astype(np.float32)
    x[7, 2, 3] = np.nan
    y = (np.arange(20) % 2).astype(np.uint8)
    write_idx(tmp_path / "train-images-idx3-ubyte", x)
    write_idx(tmp_path / "train-labels-idx1-ubyte", y)
    write_idx(tmp_path / "t10k-images-idx3-ubyte", x[:4].copy() * 0)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", y[:4])
    with pytest.raises(ValueError, match="non-finite.*training data, first at sample 7, feature 11"):
        load_dataset("mnist", tmp_path)


def test_state_dict_formats(gen):
    """State dicts are written as format 2 (indices may be int16, perm then as offsets inside rows), so a version
    that reads only format 1 refuses the record instead of calling the file damaged; format 1 (int32 indices) still
    loads; an unknown format is refused, naming the formats this version reads."""
    a, b = SparseLinear(16, 8, density=0.3, generator=gen), SparseLinear(16, 8, density=0.6, generator=gen)
    sd = a.state_dict()
    assert sd["_extra_state"][0].item() == 2
    old = {k: v for k, v in sd.items()}
    old["_extra_state"] = torch.tensor([1, 8, 16, 1])
    p = a.pattern
    old["col"], old["row"], old["perm"] = p.col.int(), p.row.int(), p.csr_positions().int()
    b.load_state_dict(old)
    x = torch.randn(2, 16)
    assert torch.equal(a(x), b(x))
    sd["_extra_state"] = torch.tensor([3, 8, 16, 1])
    with pytest.raises(RuntimeError, match=r"formats \(1, 2\)"):
        b.load_state_dict(sd)
