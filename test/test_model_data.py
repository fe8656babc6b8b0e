"""Demo dataset: chunk padding, norm stats, split, device batches, augmentation, calibration."""

import numpy as np
import pytest
import torch

from daptq_ros.model.data import (
    DemoDataset,
    calibration_batches,
    chunk_targets,
    list_demo_files,
    load_episode,
    random_shift,
    to_model_images,
)
from daptq_ros.model.io import NormStats
from daptq_ros.model.language import UnknownInstructionError
from daptq_ros.model.testing import synthetic_cache, tiny_config, write_synthetic_demos


@pytest.fixture
def demo_dir(tmp_path):
    # 2 tasks x 2 episodes of 10 and 11 frames
    return write_synthetic_demos(tmp_path / "demos", episodes_per_task=2, length=10)


def test_chunk_targets_repeat_the_final_action():
    actions = np.arange(12, dtype=np.float32).reshape(6, 2)
    chunks, valid = chunk_targets(actions, 4)
    assert chunks.shape == (6, 4, 2) and valid.shape == (6, 4)
    np.testing.assert_array_equal(chunks[0], actions[0:4])
    np.testing.assert_array_equal(chunks[4], actions[[4, 5, 5, 5]])
    np.testing.assert_array_equal(chunks[5], actions[[5, 5, 5, 5]])
    np.testing.assert_array_equal(valid[4], [1, 1, 0, 0])
    np.testing.assert_array_equal(valid[0], [1, 1, 1, 1])


def test_dataset_split_norm_and_arrays(demo_dir):
    ds = DemoDataset(demo_dir, synthetic_cache(), chunk_size=4, val_fraction=0.5, seed=0, workers=1)
    assert len(ds.episodes) == 4 and ds.tasks == ["push-v3", "reach-v3"]
    assert len(ds.train_idx) == 2 and len(ds.val_idx) == 2
    train_tasks = sorted(ds.episodes[i].task for i in ds.train_idx)
    assert train_tasks == ["push-v3", "reach-v3"]  # split per task
    train_eps = [ds.episodes[i] for i in ds.train_idx]
    raw_actions = np.concatenate([e.action for e in train_eps])
    np.testing.assert_allclose(ds.norm.action_mean, raw_actions.mean(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(ds.norm.action_std, np.maximum(raw_actions.std(0), 1e-2), rtol=1e-5)
    arrays = ds.arrays("train")
    n = sum(len(e) for e in train_eps)
    assert arrays["images"].shape == (n, 32, 32, 3) and arrays["images"].dtype == np.uint8
    assert arrays["actions"].shape == (n, 4, 4) and arrays["valid"].shape == (n, 4)
    # the last frame of the first training episode: only its own action is valid, repeated after
    last = len(train_eps[0]) - 1
    np.testing.assert_array_equal(arrays["valid"][last], [1, 0, 0, 0])
    expected = ds.norm.normalize_actions(np.repeat(train_eps[0].action[-1:], 4, axis=0))
    np.testing.assert_allclose(arrays["actions"][last], expected, rtol=1e-6)
    # paraphrase candidates per task include the episode's own instruction first
    assert (arrays["n_candidates"] == 2).all()
    assert ds.instructions[arrays["canon"][0]] == "push the puck to the goal"


def test_split_is_seeded(demo_dir):
    cache = synthetic_cache()
    a = DemoDataset(demo_dir, cache, chunk_size=4, val_fraction=0.5, seed=1, workers=1)
    b = DemoDataset(demo_dir, cache, chunk_size=4, val_fraction=0.5, seed=1, workers=1)
    assert a.val_idx == b.val_idx
    with pytest.raises(ValueError, match="empty"):
        DemoDataset(demo_dir, cache, chunk_size=4, val_fraction=0.0, workers=1).arrays("val")


def test_missing_instruction_is_reported(demo_dir):
    from daptq_ros.model.language import InstructionCache

    cache = InstructionCache()
    cache.add("push the puck to the goal", np.zeros((16, 384)), np.ones(16))
    with pytest.raises(UnknownInstructionError, match="reach the red goal position"):
        DemoDataset(demo_dir, cache, chunk_size=4, workers=1)


def test_bad_demo_files_are_named(tmp_path, demo_dir):
    with pytest.raises(FileNotFoundError, match="no demo episodes"):
        list_demo_files(tmp_path)
    bad = tmp_path / "bad" / "reach-v3"
    bad.mkdir(parents=True)
    np.savez_compressed(
        bad / "x.npz",
        image=np.zeros((3, 8, 8, 3), np.uint8),
        proprio=np.zeros((3, 4)),
        action=np.zeros((2, 4)),
        instruction=np.array("x"),
        task=np.array("reach-v3"),
    )
    with pytest.raises(ValueError, match=r"x\.npz"):
        load_episode(bad / "x.npz")


def test_device_batch_and_paraphrases(demo_dir):
    ds = DemoDataset(demo_dir, synthetic_cache(), chunk_size=4, val_fraction=0.5, workers=1)
    data = ds.to_device("train", "cpu")
    g = torch.Generator().manual_seed(0)
    idx = torch.arange(len(data))
    plain = data.batch(idx, 32)
    assert plain["image"].shape == (len(data), 3, 32, 32) and plain["image"].dtype == torch.float32
    assert 0.0 <= plain["image"].min() and plain["image"].max() <= 1.0
    assert plain["lang_tokens"].shape == (len(data), 16, 384)
    para = data.batch(idx, 32, g, paraphrase_prob=1.0, shift_pad=2)
    differs = (para["lang_tokens"] != plain["lang_tokens"]).flatten(1).any(1)
    assert 0 < int(differs.sum()) < len(data)  # some frames drew the paraphrase, some the original
    torch.testing.assert_close(para["actions"], plain["actions"])


def test_random_shift_copies_pixels():
    img = torch.rand(3, 3, 8, 8)
    assert torch.equal(random_shift(img, 0), img)
    g = torch.Generator().manual_seed(0)
    out = random_shift(img, 2, g)
    padded = torch.nn.functional.pad(img, (2, 2, 2, 2), mode="replicate")
    for b in range(3):  # every output is an exact integer-offset crop of the padded image
        found = any(
            torch.allclose(out[b], padded[b, :, dy : dy + 8, dx : dx + 8], atol=1e-5)
            for dy in range(5)
            for dx in range(5)
        )
        assert found


def test_to_model_images_resizes():
    img = torch.full((1, 64, 48, 3), 255, dtype=torch.uint8)
    out = to_model_images(img, 32)
    assert out.shape == (1, 3, 32, 32)
    torch.testing.assert_close(out, torch.ones_like(out))


def test_calibration_batches(demo_dir):
    cfg = tiny_config()
    norm = NormStats(np.zeros(4), np.ones(4), np.zeros(4), np.ones(4))
    batches = calibration_batches(
        demo_dir, synthetic_cache(), n_frames=10, batch_size=4, seed=0, norm=norm, config=cfg
    )
    assert [len(b["image"]) for b in batches] == [4, 4, 2]
    b = batches[0]
    assert set(b) == {"image", "lang_tokens", "lang_mask", "proprio", "noise"}
    assert b["image"].shape == (4, 3, 32, 32) and b["noise"].shape == (4, cfg.chunk_size, cfg.action_dim)
    again = calibration_batches(
        demo_dir, synthetic_cache(), n_frames=10, batch_size=4, seed=0, norm=norm, config=cfg
    )
    for x, y in zip(batches, again, strict=True):
        for k in x:
            assert torch.equal(x[k], y[k])
    other = calibration_batches(
        demo_dir, synthetic_cache(), n_frames=10, batch_size=4, seed=1, norm=norm, config=cfg
    )
    assert not torch.equal(other[0]["noise"], b["noise"])
    # both tasks are represented (round robin over tasks)
    masks = torch.cat([x["lang_tokens"][:, 0, :3] for x in batches])
    assert len(torch.unique(masks, dim=0)) == 2
    reg = calibration_batches(
        demo_dir,
        synthetic_cache(),
        n_frames=4,
        batch_size=4,
        norm=norm,
        config=tiny_config(head="regression"),
    )
    assert "noise" not in reg[0]


def test_calibration_batches_from_a_loaded_policy(demo_dir, tmp_path):
    from daptq_ros.model.io import load_checkpoint
    from daptq_ros.model.testing import write_tiny_checkpoint

    loaded = load_checkpoint(write_tiny_checkpoint(tmp_path / "ckpt"))
    batches = calibration_batches(demo_dir, loaded, n_frames=3, batch_size=3)
    raw = np.concatenate([load_episode(p).proprio for p in sorted(demo_dir.glob("*/*.npz"))])
    for row in batches[0]["proprio"].numpy():  # normalized with the checkpoint's stats (mean 0, std 0.5)
        unnormalized = row * loaded.norm.proprio_std + loaded.norm.proprio_mean
        assert np.abs(raw - unnormalized).sum(1).min() < 1e-5
    assert batches[0]["noise"].shape == (3, loaded.config.chunk_size, 4)
    (tmp_path / "ckpt" / "instructions.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="instruction cache"):
        calibration_batches(demo_dir, loaded, n_frames=3)
