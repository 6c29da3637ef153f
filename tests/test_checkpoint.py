"""Checkpoints: every piece of training state survives pack/unpack and a safetensors file exactly
(dtypes, int keys, tuples, RNG states), an optimizer resumed from one takes the very same next
step, and a damaged file is reported as CorruptRunError."""

from __future__ import annotations

import json
import math
import os
import random
from collections import OrderedDict

import numpy as np
import pytest
import safetensors
import torch

from creditaudit.runs import checkpoint as ck
from creditaudit.runs.checkpoint import (
    load_checkpoint,
    load_tensors,
    pack_state,
    save_checkpoint,
    save_tensors,
    unpack_state,
)
from creditaudit.runs.io import CorruptRunError


def assert_same(a, b, where="state"):
    """Exact structural equality: same container types, key types, dtypes and values."""
    assert type(a) is type(b), f"{where}: {type(a)} != {type(b)}"
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape, where
        assert torch.equal(a, b), where
    elif isinstance(a, np.ndarray):
        assert a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a, b), where
    elif isinstance(a, dict):
        assert list(a.keys()) == list(b.keys()), where  # order and key types (0 != "0")
        for k in a:
            assert_same(a[k], b[k], f"{where}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same(x, y, f"{where}[{i}]")
    elif isinstance(a, float) and math.isnan(a):
        assert math.isnan(b), where
    else:
        assert a == b, where


def roundtrip(obj):
    tensors, skeleton = pack_state(obj)
    skeleton = json.loads(json.dumps(skeleton, allow_nan=False))  # what the header stores
    return unpack_state(tensors, skeleton)


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(6, 8),
        torch.nn.LayerNorm(8),
        torch.nn.GELU(),
        torch.nn.BatchNorm1d(8),
        torch.nn.Linear(8, 3),
    )


def _adamw(model: torch.nn.Module) -> torch.optim.AdamW:
    decay = [p for n, p in model.named_parameters() if p.ndim == 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    return torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": 0.01},
            {"params": no_decay, "weight_decay": 0.0, "lr": 3e-4},
        ],
        lr=1e-3,
        betas=(0.9, 0.95),
    )


def _step(model, opt, seed):
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(16, 6, generator=g), torch.randint(0, 3, (16,), generator=g)
    opt.zero_grad()
    torch.nn.functional.cross_entropy(model(x), y).backward()
    opt.step()


# ---------------------------------------------------------------------------------------------
# pack / unpack
# ---------------------------------------------------------------------------------------------


def test_module_state_dict_roundtrip_keeps_ordered_dict_and_metadata():
    sd = _model().state_dict()
    back = roundtrip(sd)
    assert_same(sd, back)
    assert isinstance(back, OrderedDict) and back._metadata == sd._metadata
    fresh = _model()
    with torch.no_grad():
        for p in fresh.parameters():
            p.zero_()
    fresh.load_state_dict(back)
    assert_same(fresh.state_dict(), sd)


def test_adamw_state_dict_roundtrip_keeps_int_keys():
    model = _model()
    opt = _adamw(model)
    for i in range(3):
        _step(model, opt, i)
    sd = opt.state_dict()
    assert all(isinstance(k, int) for k in sd["state"])
    back = roundtrip(sd)
    assert_same(sd, back)
    assert back["param_groups"][0]["betas"] == (0.9, 0.95)  # tuple stays a tuple


def test_rng_states_roundtrip():
    torch.manual_seed(1)
    random.seed(2)
    np.random.seed(3)
    state = {
        "torch": torch.get_rng_state(),  # ByteTensor
        "generator": torch.Generator().manual_seed(5).get_state(),
        "numpy": np.random.get_state(),  # ('MT19937', uint32 ndarray, int, int, float)
        "numpy_generator": np.random.default_rng(7).bit_generator.state,  # dict with 128-bit ints
        "python": random.getstate(),  # (3, tuple of ints, None)
    }
    back = roundtrip(state)
    assert_same(state, back)

    # and the restored states reproduce the same streams
    expect = (torch.rand(3), random.random(), np.random.rand())
    torch.set_rng_state(back["torch"])
    random.setstate(back["python"])
    np.random.set_state(back["numpy"])
    assert torch.equal(torch.rand(3), expect[0])
    assert random.random() == expect[1] and np.random.rand() == expect[2]
    g = torch.Generator()
    g.set_state(back["generator"])
    assert torch.equal(
        torch.rand(4, generator=g), torch.rand(4, generator=torch.Generator().manual_seed(5))
    )


def test_scalars_dtypes_and_edge_values_roundtrip():
    obj = {
        "none": None,
        "flag": True,
        "i": -3,
        "big": 2**100,
        "f": 0.1,
        "nan": float("nan"),
        "inf": float("inf"),
        "ninf": float("-inf"),
        "s": "x/y",
        3: "int key",
        "3": "str key",
        "nested": [{"__tensor__": "user data that looks like a tag"}, (), (1, (2.5, None))],
        "np_f32": np.float32(1.5),
        "np_i64": np.int64(-7),
        "np_bool": np.bool_(True),
        "arr_be": np.arange(5, dtype=">i4"),
        "arr_2d": np.eye(2, dtype=np.float16),
        "arr_empty": np.zeros((0, 3)),
        "t_bf16": torch.randn(3, 2).to(torch.bfloat16),
        "t_bool": torch.tensor([True, False]),
        "t_scalar": torch.tensor(4.0),
        "t_empty": torch.zeros(0, 5, dtype=torch.int64),
        "t_i8": torch.tensor([-1, 2], dtype=torch.int8),
        "size": torch.Size([2, 3]),
    }
    back = roundtrip(obj)
    back["size"] = torch.Size(back["size"])  # tuple subclasses come back as tuples, by design
    assert_same(obj, back)
    assert back["arr_be"].dtype == np.dtype(">i4") and isinstance(back["np_f32"], np.float32)


def test_pack_makes_independent_contiguous_cpu_copies():
    base = torch.arange(12.0, requires_grad=True)
    view = base.detach().view(3, 4).t()  # non-contiguous, shares storage with base
    tensors, skeleton = pack_state({"w": base, "tied": base, "v": view})
    assert len(tensors) == 3
    ptrs = {t.untyped_storage().data_ptr() for t in tensors.values()}
    assert len(ptrs) == 3 and base.untyped_storage().data_ptr() not in ptrs
    assert all(
        t.is_contiguous() and t.device.type == "cpu" and not t.requires_grad
        for t in tensors.values()
    )
    back = unpack_state(tensors, skeleton)
    assert torch.equal(back["v"], view) and torch.equal(back["tied"], base.detach())


def test_flat_keys_are_readable_and_unique():
    tensors, _ = pack_state(
        {
            "model": {"a.b": torch.zeros(1)},
            "model/a.b": torch.ones(1),
            "opt": {"state": {0: {"exp_avg": torch.zeros(2)}}},
        }
    )
    assert set(tensors) == {"model/a.b", "model/a.b~1", "opt/state/0/exp_avg"}


def test_unsupported_values_are_named():
    with pytest.raises(TypeError, match=r"state\['cfg'\]\['fn'\].*function"):
        pack_state({"cfg": {"fn": lambda: 0}})
    with pytest.raises(TypeError, match="key"):
        pack_state({(1, 2): 3})
    with pytest.raises(TypeError, match=r"state\['s'\].*sparse"):
        pack_state({"s": torch.eye(2).to_sparse()})


def test_unpack_maps_to_device():
    tensors, skeleton = pack_state({"w": torch.ones(2), "rng": np.arange(3)})
    back = unpack_state(tensors, skeleton, device="meta")
    assert back["w"].device.type == "meta" and isinstance(back["rng"], np.ndarray)


# ---------------------------------------------------------------------------------------------
# files
# ---------------------------------------------------------------------------------------------


def test_checkpoint_file_roundtrip_and_is_plain_safetensors(tmp_path):
    model = _model()
    opt = _adamw(model)
    _step(model, opt, 0)
    state = {
        "epoch": 3,
        "model": model.state_dict(),
        "optimizer": opt.state_dict(),
        "rng": {
            "torch": torch.get_rng_state(),
            "numpy": np.random.get_state(),
            "python": random.getstate(),
        },
        "rule": {"B": [torch.randn(8, 3), torch.randn(8, 3)]},
    }
    meta = {"epoch": 3, "best": float("nan"), "note": "ü"}
    path = tmp_path / "checkpoints" / "last.safetensors"
    save_checkpoint(path, state, meta)
    assert os.listdir(path.parent) == ["last.safetensors"]  # no temp file left

    with safetensors.safe_open(str(path), framework="pt") as f:  # any safetensors reader works
        header = f.metadata()
        assert "model/0.weight" in set(f.keys())
    assert header["creditaudit.format"] == "1"
    json.loads(header["creditaudit.skeleton"])

    back, back_meta = load_checkpoint(path)
    assert_same(state, back)
    assert back_meta == {"epoch": 3, "best": None, "note": "ü"}
    assert load_checkpoint(path, device="cpu")[0]["model"]["0.weight"].device.type == "cpu"


def test_resumed_adamw_takes_the_same_next_step(tmp_path):
    model = _model()
    opt = _adamw(model)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=10)
    for i in range(3):
        _step(model, opt, i)
        sched.step()
    path = tmp_path / "last.safetensors"
    save_checkpoint(
        path,
        {
            "model": model.state_dict(),
            "optimizer": opt.state_dict(),
            "scheduler": sched.state_dict(),
        },
    )

    _step(model, opt, 99)  # the original run's next step
    sched.step()
    expected = {k: v.clone() for k, v in model.state_dict().items()}

    state, _ = load_checkpoint(path)
    model2 = _model()
    opt2 = _adamw(model2)
    sched2 = torch.optim.lr_scheduler.CosineAnnealingLR(opt2, T_max=10)
    model2.load_state_dict(state["model"])
    opt2.load_state_dict(state["optimizer"])
    sched2.load_state_dict(state["scheduler"])
    _step(model2, opt2, 99)
    sched2.step()
    for k, v in model2.state_dict().items():
        assert torch.equal(v, expected[k]), k  # bit-for-bit
    assert opt2.param_groups[0]["lr"] == opt.param_groups[0]["lr"]


def test_save_is_atomic_when_the_rename_fails(tmp_path, monkeypatch):
    path = tmp_path / "last.safetensors"
    save_checkpoint(path, {"w": torch.ones(2)}, {"epoch": 1})
    monkeypatch.setattr(ck.os, "replace", lambda a, b: (_ for _ in ()).throw(OSError("crash")))
    with pytest.raises(OSError, match="crash"):
        save_checkpoint(path, {"w": torch.zeros(2)}, {"epoch": 2})
    assert os.listdir(tmp_path) == ["last.safetensors"]
    state, meta = load_checkpoint(path)
    assert torch.equal(state["w"], torch.ones(2)) and meta == {"epoch": 1}


@pytest.mark.parametrize("damage", ["truncate_data", "truncate_header", "garbage", "empty"])
def test_damaged_checkpoint_raises_corrupt_run_error(tmp_path, damage):
    path = tmp_path / "last.safetensors"
    save_checkpoint(path, {"w": torch.randn(64), "step": 5})
    data = path.read_bytes()
    damaged = {
        "truncate_data": data[:-7],
        "truncate_header": data[:20],
        "garbage": b"\x93NUMPY not a checkpoint" * 4,
        "empty": b"",
    }[damage]
    path.write_bytes(damaged)
    with pytest.raises(CorruptRunError) as err:
        load_checkpoint(path)
    msg = str(err.value)
    assert str(path) in msg and "delete it to restart the run from scratch" in msg


def test_missing_or_foreign_checkpoint_raises_corrupt_run_error(tmp_path):
    with pytest.raises(CorruptRunError, match=r"missing.*delete it"):
        load_checkpoint(tmp_path / "nope.safetensors")
    save_tensors(tmp_path / "weights.safetensors", {"w": torch.ones(1)})
    with pytest.raises(CorruptRunError, match="not a creditaudit checkpoint"):
        load_checkpoint(tmp_path / "weights.safetensors")


def test_save_and_load_tensors(tmp_path):
    lin = torch.nn.Linear(4, 4)
    weights = {
        "emb.weight": lin.weight,
        "head.weight": lin.weight,  # tied
        "t": torch.arange(6.0).view(2, 3).t(),
    }
    path = tmp_path / "model.safetensors"
    save_tensors(path, weights, metadata={"arch": "resmlp"})
    back = load_tensors(path)
    assert set(back) == set(weights)
    for k in weights:
        assert torch.equal(back[k], weights[k].detach())
    with safetensors.safe_open(str(path), framework="pt") as f:
        assert f.metadata() == {"arch": "resmlp"}
    with pytest.raises(TypeError, match="str -> str"):
        save_tensors(path, weights, metadata={"epoch": 3})  # type: ignore[dict-item]
    path.write_bytes(b"junk")
    with pytest.raises(CorruptRunError, match="delete the file"):
        load_tensors(path)


def test_no_pickle_in_the_checkpoint_module():
    import inspect

    src = inspect.getsource(ck)
    assert "torch.load(" not in src and "import pickle" not in src
