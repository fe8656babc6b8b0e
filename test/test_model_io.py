"""Checkpoint IO and normalization statistics."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from daptq_ros.model.io import (
    CHECKPOINT_KEY,
    CheckpointError,
    NormStats,
    load_checkpoint,
    read_metadata,
    save_checkpoint,
)
from daptq_ros.model.testing import tiny_config
from daptq_ros.model.vla import ReferenceVLA


@pytest.fixture
def norm():
    return NormStats(
        np.array([0.0, 0.6, 0.2, 0.5]),
        np.array([0.1, 0.1, 0.05, 0.3]),
        np.array([0.0, 0.1, -0.1, 0.2]),
        np.array([0.5, 0.4, 0.3, 0.9]),
    )


@pytest.mark.parametrize("head", ["flow", "regression"])
def test_round_trip_is_bit_exact(tmp_path, norm, head):
    torch.manual_seed(0)
    model = ReferenceVLA(tiny_config(head=head))
    path = save_checkpoint(
        tmp_path / "sub" / "ckpt.safetensors",
        model,
        norm,
        {"instructions": ["open the drawer"], "train": {"seed": 3}},
    )
    loaded = load_checkpoint(path)
    assert loaded.config == model.config
    assert loaded.instructions == ["open the drawer"]
    assert loaded.meta["train"] == {"seed": 3}
    assert not loaded.model.training
    for k, v in model.state_dict().items():
        assert torch.equal(v, loaded.model.state_dict()[k]), k
    for name in ("proprio_mean", "proprio_std", "action_mean", "action_std"):
        np.testing.assert_array_equal(getattr(loaded.norm, name), getattr(norm, name).astype(np.float32))
    x = model.example_inputs(2)
    with torch.no_grad():
        assert torch.equal(model.eval()(**x), loaded.model(**x))


def test_refuses_foreign_and_missing_files(tmp_path, norm):
    with pytest.raises(FileNotFoundError, match="not found"):
        load_checkpoint(tmp_path / "nope.safetensors")
    foreign = tmp_path / "foreign.safetensors"
    save_file({"w": torch.zeros(2)}, str(foreign), metadata={"producer": "someone else"})
    with pytest.raises(CheckpointError, match="not a daptq checkpoint"):
        load_checkpoint(foreign)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00\x01not a safetensors file at all")
    with pytest.raises(CheckpointError, match="safetensors"):
        load_checkpoint(garbage)
    quant = tmp_path / "quant.safetensors"
    save_file({"w": torch.zeros(2)}, str(quant), metadata={"daptq.quant": json.dumps({"method": "rtn"})})
    with pytest.raises(CheckpointError, match="quantized"):
        load_checkpoint(quant)


def _rewrite_meta(src, dst, edit):
    meta = read_metadata(src)[CHECKPOINT_KEY]
    edit(meta)
    save_file(load_file(str(src)), str(dst), metadata={CHECKPOINT_KEY: json.dumps(meta)})


def test_config_mismatch_is_reported(tmp_path, norm):
    path = save_checkpoint(tmp_path / "ckpt.safetensors", ReferenceVLA(tiny_config()), norm)
    bad = tmp_path / "bad.safetensors"
    _rewrite_meta(path, bad, lambda m: m["config"].update(d_model=64, head_dim=64))
    with pytest.raises(CheckpointError, match="shapes do not match"):
        load_checkpoint(bad)
    _rewrite_meta(path, bad, lambda m: m["config"].update(head="regression"))
    with pytest.raises(CheckpointError, match="missing"):
        load_checkpoint(bad)
    _rewrite_meta(path, bad, lambda m: m["config"].update(colour="red"))
    with pytest.raises(CheckpointError, match="colour"):
        load_checkpoint(bad)
    _rewrite_meta(path, bad, lambda m: m.update(format="other"))
    with pytest.raises(CheckpointError, match="format"):
        load_checkpoint(bad)
    _rewrite_meta(path, bad, lambda m: m["norm"].update(action_std=[1.0, 0.0, 1.0, 1.0]))
    with pytest.raises(CheckpointError, match="action_std"):
        load_checkpoint(bad)


def test_extra_metadata_cannot_override_reserved_keys(tmp_path, norm):
    with pytest.raises(ValueError, match="config"):
        save_checkpoint(tmp_path / "x.safetensors", ReferenceVLA(tiny_config()), norm, {"config": {}})


def test_norm_stats_round_trip_and_floor():
    rng = np.random.default_rng(0)
    proprio = rng.normal([0, 0.6, 0.2, 0.5], [0.1, 0.2, 0.05, 0.0], size=(500, 4))
    actions = rng.normal(0, [0.5, 0.4, 0.3, 1.0], size=(500, 4))
    stats = NormStats.from_data(proprio, actions, std_floor=1e-2)
    assert stats.proprio_std[3] == pytest.approx(1e-2)  # constant dimension floored
    np.testing.assert_allclose(stats.proprio_mean, proprio.mean(0), rtol=1e-5, atol=1e-6)
    a = actions[:7].astype(np.float32)
    np.testing.assert_allclose(stats.unnormalize_actions(stats.normalize_actions(a)), a, rtol=1e-5, atol=1e-5)
    assert stats.normalize_proprio(proprio[:3]).dtype == np.float32
    again = NormStats.from_dict(json.loads(json.dumps(stats.to_dict())))
    np.testing.assert_array_equal(again.action_std, stats.action_std)
    with pytest.raises(ValueError, match="action_mean"):
        NormStats.from_dict({"proprio_mean": [0], "proprio_std": [1], "action_std": [1]})
    with pytest.raises(ValueError, match="proprio_std"):
        NormStats(np.zeros(2), np.array([1.0, -1.0]), np.zeros(2), np.ones(2))
