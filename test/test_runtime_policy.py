"""PolicySession verification/refusals and OnnxStepPolicy against the torch toy policy."""

import json
import shutil

import numpy as np
import onnx
import pytest
import torch
from test_export_fp32 import INSTRUCTIONS, NORM, build_artifact

from daptq_ros.policy_api import Observation, StepPolicy
from daptq_ros.runtime.chunking import ChunkingConfig
from daptq_ros.runtime.instructions import UnknownInstructionError
from daptq_ros.runtime.manifest import ManifestError
from daptq_ros.runtime.onnx_policy import NonFiniteActionError, OnnxStepPolicy, draw_noise
from daptq_ros.runtime.session import ArtifactError, PolicySession


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    return build_artifact(tmp_path_factory.mktemp("rt") / "art")


@pytest.fixture
def copy(artifact, tmp_path):
    dst = tmp_path / "copy"
    shutil.copytree(artifact[1], dst)
    return dst


def _obs(rng, size=128):
    return Observation(
        image=rng.integers(0, 256, (size, size, 3), dtype=np.uint8),
        proprio=rng.standard_normal(4).astype(np.float32),
    )


def test_session_runs_and_records_provider(artifact):
    sess = PolicySession(artifact[1], threads=1)
    assert sess.provider == "CPUExecutionProvider"
    feeds = {s.name: np.zeros(s.shape, np.float32) for s in sess.manifest.inputs}
    out = sess.run(feeds)
    assert out["actions"].shape == (1, 8, 4) and sess.last_latency_s > 0
    with pytest.raises(ValueError, match="missing inputs \\['noise'\\]"):
        sess.run({k: v for k, v in feeds.items() if k != "noise"})
    feeds["proprio"] = np.zeros((1, 5), np.float32)
    with pytest.raises(ValueError, match="input 'proprio' has shape"):
        sess.run(feeds)


def test_refuses_corrupt_model(copy):
    data = bytearray((copy / "model.onnx").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (copy / "model.onnx").write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="checksum mismatch"):
        PolicySession(copy)


def test_refuses_missing_manifest_key(copy):
    manifest = json.loads((copy / "manifest.json").read_text())
    del manifest["chunk_size"]
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ManifestError, match="chunk_size"):
        PolicySession(copy)


def test_refuses_missing_model(copy):
    (copy / "model.onnx").unlink()
    with pytest.raises(ArtifactError, match=r"model\.onnx is missing"):
        PolicySession(copy)
    with pytest.raises(ArtifactError, match="artifact directory not found"):
        PolicySession(copy / "nope")


def test_refuses_renamed_input_even_with_fixed_checksum(copy):
    from daptq_ros.runtime.manifest import sha256_file

    model = onnx.load(str(copy / "model.onnx"))
    for node in model.graph.node:
        node.input[:] = ["proprio_x" if n == "proprio" else n for n in node.input]
    model.graph.input[3].name = "proprio_x"
    onnx.save(model, str(copy / "model.onnx"))
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["model_sha256"] = sha256_file(copy / "model.onnx")
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="do not match the manifest"):
        PolicySession(copy)


def test_refuses_shape_mismatch(copy):
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["inputs"][3]["shape"] = [1, 5]
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="input 'proprio' has shape \\[1, 4\\], manifest says \\[1, 5\\]"):
        PolicySession(copy)


def test_policy_matches_torch(artifact, rng):
    model, out = artifact
    policy = OnnxStepPolicy(out, threads=1, allow_encode=False)
    assert isinstance(policy, StepPolicy) and policy.chunk_size == 8
    policy.reset(INSTRUCTIONS[1], seed=5)
    obs = _obs(rng)
    chunk = policy.predict_chunk(obs)
    # Torch reference with the same preprocessing and the same seeded noise draw.
    tokens, mask = policy.instructions.lookup(INSTRUCTIONS[1])
    noise = draw_noise(np.random.default_rng(5), 8, 4)
    feeds = {
        "image": torch.from_numpy(obs.image.astype(np.float32).transpose(2, 0, 1)[None] / 255.0),
        "lang_tokens": torch.from_numpy(tokens[None]),
        "lang_mask": torch.from_numpy(mask[None]),
        "proprio": torch.from_numpy(
            (
                (obs.proprio - np.array(NORM["proprio_mean"], np.float32))
                / np.array(NORM["proprio_std"], np.float32)
            )[None]
        ),
        "noise": torch.from_numpy(noise[None]),
    }
    with torch.no_grad():
        ref = model(**feeds).numpy()[0] * np.array(NORM["action_std"]) + np.array(NORM["action_mean"])
    np.testing.assert_allclose(chunk, ref, atol=1e-4)
    # Same seed -> same noise -> same chunk; the next draw differs.
    policy.reset(INSTRUCTIONS[1], seed=5)
    np.testing.assert_array_equal(policy.predict_chunk(obs), chunk)
    assert not np.allclose(policy.predict_chunk(obs), chunk)


def test_act_replans_every_execute_steps(artifact, rng):
    policy = OnnxStepPolicy(
        artifact[1], chunking=ChunkingConfig(execute_steps=3), threads=1, allow_encode=False
    )
    policy.reset(INSTRUCTIONS[0], seed=0)
    obs = _obs(rng, size=96)  # resized to 128 x 128
    actions = [policy.act(obs) for _ in range(7)]
    assert all(a.shape == (4,) for a in actions) and policy.executor.replans == 3


def test_unknown_instruction_and_non_finite(artifact, rng, monkeypatch):
    policy = OnnxStepPolicy(artifact[1], threads=1, allow_encode=False)
    with pytest.raises(UnknownInstructionError, match="reach the red target"):
        policy.reset("open the drawer", seed=0)
    policy.reset("  reach the   red target ", seed=0)  # whitespace-normalized lookup
    obs = _obs(rng)
    monkeypatch.setattr(
        policy.session, "run", lambda feeds: {"actions": np.full((1, 8, 4), np.nan, np.float32)}
    )
    with pytest.raises(NonFiniteActionError, match="non-finite"):
        policy.predict_chunk(obs)


def test_predict_chunk_raw_validates_inputs(artifact, rng):
    policy = OnnxStepPolicy(artifact[1], threads=1, allow_encode=False)
    img = rng.integers(0, 256, (128, 128, 3), dtype=np.uint8)
    noise = np.zeros((8, 4), np.float32)
    out = policy.predict_chunk_raw(img, INSTRUCTIONS[0], np.zeros(4), noise)
    assert out.shape == (8, 4) and out.dtype == np.float32
    with pytest.raises(ValueError, match="pass noise"):
        policy.predict_chunk_raw(img, INSTRUCTIONS[0], np.zeros(4), None)
    with pytest.raises(ValueError, match="proprio has 3 values"):
        policy.predict_chunk_raw(img, INSTRUCTIONS[0], np.zeros(3), noise)
