"""manifest.json round trip and validation errors that name the key."""

import json

import pytest

from daptq_ros.runtime.manifest import (
    FORMAT_VERSION,
    Manifest,
    ManifestError,
    TensorSpec,
    read_manifest,
    sha256_file,
    write_manifest,
)

NORM = {
    "proprio_mean": [0.0] * 4,
    "proprio_std": [1.0] * 4,
    "action_mean": [0.0] * 4,
    "action_std": [1.0] * 4,
}


def make(**overrides):
    kwargs = dict(
        model_sha256="ab" * 32,
        inputs=[TensorSpec("image", (1, 3, 128, 128)), TensorSpec("proprio", (1, 4))],
        outputs=[TensorSpec("actions", (1, 8, 4))],
        normalization=NORM,
        chunk_size=8,
        action_names=["dx", "dy", "dz", "gripper"],
    )
    kwargs.update(overrides)
    return Manifest(**kwargs)


def test_round_trip(tmp_path):
    m = make(
        method="daptq",
        budget=4.0,
        avg_bits=4.2,
        flavour="trt",
        layers={"trunk.blocks.0.attn.q_proj": {"w_bits": 4, "a_bits": 16, "group_size": 32}},
    )
    write_manifest(m, tmp_path)
    back = read_manifest(tmp_path)
    assert back == m
    assert back.package_version and back.format_version == FORMAT_VERSION
    assert back.input("proprio").shape == (1, 4) and back.input("noise") is None


def _rewrite(tmp_path, mutate):
    write_manifest(make(), tmp_path)
    path = tmp_path / "manifest.json"
    data = json.loads(path.read_text())
    mutate(data)
    path.write_text(json.dumps(data))


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda d: d.pop("normalization"), r"missing key\(s\) \['normalization'\]"),
        (lambda d: d.pop("format_version"), r"missing key\(s\) \['format_version'\]"),
        (lambda d: d.update(extra_key=1), r"unknown key\(s\) \['extra_key'\]"),
        (lambda d: d.update(format_version=99), "format_version 99 is not supported"),
        (lambda d: d.update(flavour="tpu"), "flavour 'tpu'"),
        (
            lambda d: d["normalization"].update(action_std=[1.0, 0.0, 1.0, 1.0]),
            "action_std must be finite and > 0",
        ),
        (lambda d: d["normalization"].pop("proprio_mean"), "normalization is missing"),
        (lambda d: d["inputs"][0].pop("dtype"), r"inputs\[0\] must be an object"),
        (lambda d: d.update(model_sha256="xyz"), "model_sha256 must be 64"),
        (lambda d: d.update(action_names=["dx"]), "action_mean has 4 values but action_names has 1"),
    ],
)
def test_invalid_manifests_name_the_key(tmp_path, mutate, message):
    _rewrite(tmp_path, mutate)
    with pytest.raises(ManifestError, match=message):
        read_manifest(tmp_path)


def test_missing_and_non_json(tmp_path):
    with pytest.raises(ManifestError, match="manifest not found"):
        read_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(ManifestError, match="not valid JSON"):
        read_manifest(tmp_path / "manifest.json")


def test_sha256_file(tmp_path):
    p = tmp_path / "f.bin"
    p.write_bytes(b"abc")
    assert sha256_file(p) == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
