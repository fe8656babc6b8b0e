"""Calibration batches from a bag (`quantize --calib-bag`): contract shapes, spread, determinism."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
from test_drift_fixtures import INSTRUCTIONS, synthetic_episodes, topics

from daptq_ros.drift.bag_calibration import calibration_batches, calibration_batches_from_bag, select_frames
from daptq_ros.drift.bag_io import BagError, BagFrames
from daptq_ros.drift.bag_writer import write_episodes_bag
from daptq_ros.runtime.instructions import InstructionTable

NORM = {"proprio_mean": [0.0, 0.6, 0.2, 1.0], "proprio_std": [0.1, 0.1, 0.1, 0.5]}


@pytest.fixture(scope="module")
def bag(tmp_path_factory):
    return write_episodes_bag(
        tmp_path_factory.mktemp("cal") / "bag", synthetic_episodes(3, 10, side=32), topics()
    )


@pytest.fixture(scope="module")
def table():
    rng = np.random.default_rng(0)
    return InstructionTable(
        {t: (rng.normal(size=(16, 384)).astype(np.float32), np.ones(16, np.float32)) for t in INSTRUCTIONS}
    )


def test_select_frames_spreads_across_episodes():
    episodes = np.repeat([0, 1, 2, 3], [50, 5, 5, 40])
    picks = select_frames(episodes, 12, seed=0)
    assert len(set(picks)) == 12
    assert np.bincount(episodes[picks], minlength=4).tolist() == [3, 3, 3, 3]
    assert select_frames(episodes, 12, seed=0) == picks
    assert sorted(select_frames(episodes[:7], 50, seed=1)) == list(range(7))


def test_batches_match_the_model_io_contract(bag, table):
    batches = calibration_batches_from_bag(
        bag,
        topics(),
        n_frames=20,
        batch_size=8,
        seed=3,
        cache=table,
        norm=NORM,
        image_size=16,
        noise_shape=(8, 4),
    )
    assert [b["image"].shape[0] for b in batches] == [8, 8, 4]
    b = batches[0]
    assert (
        tuple(b["image"].shape) == (8, 3, 16, 16)
        and 0.0 <= float(b["image"].min()) <= float(b["image"].max()) <= 1.0
    )
    assert tuple(b["lang_tokens"].shape) == (8, 16, 384) and tuple(b["lang_mask"].shape) == (8, 16)
    assert tuple(b["noise"].shape) == (8, 8, 4)
    # proprio normalized with the policy's stats: synthetic hands sit near the mean.
    assert float(b["proprio"].abs().max()) < 1.0
    # Every episode (so every instruction) is represented, with its own features.
    toks = np.concatenate([x["lang_tokens"].numpy() for x in batches])
    hit = {t for t in INSTRUCTIONS if any(np.allclose(tk, table.lookup(t)[0]) for tk in toks)}
    assert hit == set(INSTRUCTIONS)
    again = calibration_batches_from_bag(
        bag,
        topics(),
        n_frames=20,
        batch_size=8,
        seed=3,
        cache=table,
        norm=NORM,
        image_size=16,
        noise_shape=(8, 4),
    )
    assert all(
        np.array_equal(x[k].numpy(), y[k].numpy()) for x, y in zip(batches, again, strict=True) for k in x
    )


def test_loaded_policy_entry_point_and_errors(bag, table, tmp_path):
    config = SimpleNamespace(image_size=16, chunk_size=8, action_dim=4, uses_noise=False)
    norm = SimpleNamespace(
        proprio_mean=np.array(NORM["proprio_mean"]), proprio_std=np.array(NORM["proprio_std"])
    )
    policy = SimpleNamespace(config=config, norm=norm)
    batches = calibration_batches(bag, policy, frames=6, seed=0, cache=table)
    assert len(batches) == 1 and "noise" not in batches[0]
    # Without an explicit cache, the one saved next to the checkpoint is used.
    table.save(tmp_path / "instructions.safetensors")
    policy.path = tmp_path / "policy.safetensors"
    again = calibration_batches(bag, policy, frames=6, seed=0)
    np.testing.assert_array_equal(again[0]["lang_tokens"].numpy(), batches[0]["lang_tokens"].numpy())
    with pytest.raises(BagError, match="normalization stats"):
        calibration_batches_from_bag(bag, topics(), cache=table)
    odd = InstructionTable({"something else": (np.zeros((16, 384), np.float32), np.ones(16, np.float32))})
    with pytest.raises(BagError, match="not in the instruction cache"):
        calibration_batches_from_bag(bag, topics(), n_frames=4, cache=_NoEncode(odd), norm=NORM)


class _NoEncode:
    """An instruction table that never falls back to the MiniLM encoder."""

    def __init__(self, table):
        self.table = table

    def lookup(self, text):
        return self.table.lookup(text, allow_encode=False)


def test_quantize_calib_bag_then_drift_check(tmp_path):
    """`daptq quantize --calib-bag` on a recorded-style bag, then drift-check FP vs the result."""
    import json

    from daptq_ros.cli import main
    from daptq_ros.model.testing import write_synthetic_demos, write_tiny_checkpoint

    ckpt = write_tiny_checkpoint(tmp_path / "ckpt")
    write_synthetic_demos(tmp_path / "demos", episodes_per_task=2, length=16)
    bag = tmp_path / "bag"
    assert main(["record", "--out", str(bag), "--from-demos", str(tmp_path / "demos")]) == 0
    out = tmp_path / "q"
    assert (
        main(
            [
                "quantize",
                "--checkpoint",
                str(ckpt),
                "--calib-bag",
                str(bag),
                "--method",
                "rtn",
                "--w-bits",
                "4",
                "--calib-frames",
                "64",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    quantized = out / "quantized.safetensors"
    report = tmp_path / "report"
    code = main(
        [
            "drift-check",
            "--bag",
            str(bag),
            "--reference",
            str(ckpt),
            "--candidate",
            str(quantized),
            "--report",
            str(report),
            "--no-progress",
        ]
    )
    summary = json.loads((report / "report.json").read_text())
    assert code == (0 if summary["passed"] else 1)
    assert summary["frames"] == len(list(BagFrames(bag, topics()))) and summary["episodes"] == 4
    assert summary["drift"]["max_m"] > 0  # 4-bit weights move the actions
