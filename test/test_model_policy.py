"""TorchPolicy (StepPolicy over a checkpoint) and the quantization adapter."""

import numpy as np
import pytest
import torch

from daptq_ros.model.adapter import ReferenceVLAAdapter
from daptq_ros.model.data import calibration_batches
from daptq_ros.model.io import NormStats
from daptq_ros.model.language import UnknownInstructionError
from daptq_ros.model.testing import (
    synthetic_cache,
    tiny_config,
    write_synthetic_demos,
    write_tiny_checkpoint,
)
from daptq_ros.model.torch_policy import TorchPolicy
from daptq_ros.model.vla import ReferenceVLA
from daptq_ros.policy_api import ACTION_NAMES, Observation, StepPolicy
from daptq_ros.quant.adapter import AdapterError
from daptq_ros.runtime.chunking import ChunkingConfig


@pytest.fixture
def ckpt(tmp_path):
    path = write_tiny_checkpoint(tmp_path)  # with a non-trivial (perturbed) action head
    return path, TorchPolicy.from_checkpoint(path, allow_encode=False)


def _obs(size=32, value=100):
    return Observation(
        image=np.full((size, size, 3), value, np.uint8), proprio=np.array([0.0, 0.6, 0.2, 0.5])
    )


def test_policy_satisfies_the_protocol_and_executes_chunks(ckpt):
    _, policy = ckpt
    assert isinstance(policy, StepPolicy)
    calls = []
    policy.model.register_forward_hook(lambda *a: calls.append(1))
    policy.reset("reach the red goal position", seed=0)
    actions = [policy.act(_obs()) for _ in range(6)]
    assert len(calls) == 2  # default: execute 4 actions per chunk (tiny chunk size 4), then re-plan
    assert all(a.shape == (4,) and a.dtype == np.float32 for a in actions)


@pytest.fixture
def policy_execute2(tmp_path):
    path = write_tiny_checkpoint(tmp_path)
    return TorchPolicy.from_checkpoint(path, chunking=ChunkingConfig(execute_steps=2), allow_encode=False)


def test_replans_every_execute_steps(policy_execute2):
    policy = policy_execute2
    calls = []
    policy.model.register_forward_hook(lambda *a: calls.append(1))
    policy.reset("push the puck to the goal", seed=0)
    chunk = policy.predict_chunk(_obs(), noise=np.zeros((4, 4), np.float32))
    assert chunk.shape == (4, 4)
    calls.clear()
    for _ in range(6):
        policy.act(_obs())
    assert len(calls) == 3


def test_noise_is_seeded_per_episode(ckpt):
    _, policy = ckpt
    policy.reset("reach the red goal position", seed=5)
    a = [policy.predict_chunk(_obs()) for _ in range(2)]
    policy.reset("reach the red goal position", seed=5)
    b = [policy.predict_chunk(_obs()) for _ in range(2)]
    policy.reset("reach the red goal position", seed=6)
    c = policy.predict_chunk(_obs())
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    assert not np.allclose(a[0], a[1])  # a fresh draw per chunk
    assert not np.allclose(a[0], c)
    noise = np.ones((4, 4), np.float32)
    np.testing.assert_array_equal(policy.predict_chunk(_obs(), noise), policy.predict_chunk(_obs(), noise))


def test_actions_are_unnormalized_and_images_resized(ckpt):
    _, policy = ckpt
    policy.reset("reach the red goal position", seed=0)
    noise = np.zeros((4, 4), np.float32)
    small = policy.predict_chunk(_obs(32), noise)
    big = policy.predict_chunk(_obs(64), noise)  # resized to 32 px: same constant image
    np.testing.assert_allclose(small, big, rtol=1e-5, atol=1e-5)
    # un-normalization: raw = normalized * std + mean (std 0.5, mean 0 in the tiny checkpoint)
    inputs = policy._inputs(_obs(32))
    with torch.no_grad():
        normalized = policy.model(**inputs, noise=torch.zeros(1, 4, 4))[0].numpy()
    np.testing.assert_allclose(small, normalized * 0.5, rtol=1e-5, atol=1e-6)


def test_policy_errors(ckpt):
    _, policy = ckpt
    with pytest.raises(RuntimeError, match="reset"):
        policy.act(_obs())
    with pytest.raises(UnknownInstructionError, match="known instructions"):
        policy.reset("fly to the moon", seed=0)
    policy.reset("reach the red goal position", seed=0)
    with pytest.raises(ValueError, match="uint8"):
        policy.act(Observation(image=np.zeros((32, 32, 3), np.float32), proprio=np.zeros(4)))
    with pytest.raises(ValueError, match="proprio"):
        policy.act(Observation(image=np.zeros((32, 32, 3), np.uint8), proprio=np.zeros(3)))
    with pytest.raises(ValueError, match="noise"):
        policy.predict_chunk(_obs(), noise=np.zeros((8, 4)))


def test_explicit_instruction_cache_path(tmp_path):
    path = write_tiny_checkpoint(tmp_path / "a")
    (tmp_path / "a" / "instructions.safetensors").rename(tmp_path / "cache.safetensors")
    policy = TorchPolicy.from_checkpoint(
        path, instructions=tmp_path / "cache.safetensors", allow_encode=False
    )
    policy.reset("push the puck to the goal", 0)
    with pytest.raises(FileNotFoundError):
        TorchPolicy.from_checkpoint(path, instructions=tmp_path / "nope.safetensors")


@pytest.mark.parametrize("head", ["flow", "regression"])
def test_adapter_validates_on_calibration_batches(tmp_path, head):
    cfg = tiny_config(head=head)
    torch.manual_seed(0)
    model = ReferenceVLA(cfg).eval()
    demos = write_synthetic_demos(tmp_path / "demos", episodes_per_task=1, length=6)
    norm = NormStats(np.zeros(4), np.ones(4), np.zeros(4), np.ones(4))
    batches = calibration_batches(demos, synthetic_cache(), n_frames=6, batch_size=3, norm=norm, config=cfg)
    adapter = ReferenceVLAAdapter()
    out = adapter.validate(model, batches[0])
    assert out.shape == (3, cfg.chunk_size, cfg.action_dim)
    assert adapter.interface_layers(model) == ["vl_action_interface.fc1", "vl_action_interface.fc2"]
    layers = adapter.quantizable_layers(model)
    assert (
        "vision.conv1" in layers and "trunk.blocks.0.attn.q_proj" in layers and "action_head.final" in layers
    )
    assert adapter.action_head_prefix == "action_head" and adapter.action_space == "ee_delta"
    assert tuple(adapter.action_dim_names) == ACTION_NAMES
    with torch.no_grad():
        assert torch.equal(adapter.run(model, batches[0]), adapter.run(model, batches[0]))
    if head == "flow":
        with pytest.raises(AdapterError, match="noise"):
            adapter.run(model, {k: v for k, v in batches[0].items() if k != "noise"})
    with pytest.raises(AdapterError, match="proprio"):
        adapter.run(model, {k: v for k, v in batches[0].items() if k != "proprio"})


def test_quantized_checkpoint_is_loaded_through_the_quant_package(tmp_path):
    """A checkpoint written by daptq_ros.quant (detected by its `daptq.quant` metadata) loads."""
    api = pytest.importorskip("daptq_ros.quant.api")
    qckpt = pytest.importorskip("daptq_ros.quant.checkpoint")
    recipe_mod = pytest.importorskip("daptq_ros.quant.recipe")
    from daptq_ros.model.io import CHECKPOINT_KEY, load_checkpoint, read_metadata

    fp_path = write_tiny_checkpoint(tmp_path)
    demos = write_synthetic_demos(tmp_path / "demos", episodes_per_task=1, length=8)
    loaded = load_checkpoint(fp_path)
    batches = calibration_batches(demos, loaded, n_frames=16, batch_size=8)
    recipe = recipe_mod.load_recipe(
        {"method": "rtn", "w_bits": 8, "a_bits": 16, "calib_frames": 16, "min_calib_frames": 8}
    )
    result = api.quantize_policy(loaded.model, ReferenceVLAAdapter(), batches, recipe)
    q_path = qckpt.save_quantized(
        tmp_path / "q8.safetensors", loaded.model, result, base=read_metadata(fp_path)[CHECKPOINT_KEY]
    )
    quant = TorchPolicy.from_checkpoint(q_path, allow_encode=False)
    fp = TorchPolicy.from_checkpoint(fp_path, allow_encode=False)
    assert "quant" in quant.meta and quant.config == fp.config
    noise = np.random.default_rng(0).standard_normal((4, 4)).astype(np.float32)
    for p in (quant, fp):
        p.reset("reach the red goal position", seed=0)
    q_chunk, fp_chunk = quant.predict_chunk(_obs(), noise), fp.predict_chunk(_obs(), noise)
    assert not np.array_equal(q_chunk, fp_chunk)  # weights really are quantized
    np.testing.assert_allclose(q_chunk, fp_chunk, atol=0.05)  # ... to 8 bits: close
