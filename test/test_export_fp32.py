"""FP32 ONNX export of a contract-shaped toy policy: parity with torch, manifest, instructions.

``ToyVLA`` and ``build_artifact`` are shared with the runtime and QDQ tests.
"""

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from daptq_ros.export.onnx_export import ExportError, export_policy
from daptq_ros.runtime.instructions import InstructionTable
from daptq_ros.runtime.manifest import read_manifest, sha256_file

CHUNK, ACT, L, D = 8, 4, 16, 384
NORM = {
    "proprio_mean": [0.1, 0.6, 0.2, 0.5],
    "proprio_std": [0.1, 0.1, 0.05, 0.3],
    "action_mean": [0.0, 0.1, -0.1, 0.2],
    "action_std": [0.5, 0.4, 0.3, 0.9],
}
INSTRUCTIONS = ["reach the red target", "push the puck to the goal"]


class ToyVLA(nn.Module):
    """Tiny policy with the contract I/O: conv stem, 3-D Linears (MatMul), 2-D Linears (Gemm)."""

    def __init__(self, d: int = 32, flow: bool = True) -> None:
        super().__init__()
        self.flow = flow
        self.vision = nn.Sequential(nn.Conv2d(3, 8, 8, stride=8), nn.GELU())
        self.vis_proj = nn.Linear(8, d)
        self.lang_proj = nn.Linear(D, d)
        self.proprio_proj = nn.Linear(4, d)
        self.fc1 = nn.Linear(d, 64)
        self.fc2 = nn.Linear(64, d)
        self.noise_proj = nn.Linear(ACT, d)
        self.queries = nn.Parameter(torch.randn(CHUNK, d) * 0.1)
        self.head = nn.Linear(d, ACT)

    def forward(self, image, lang_tokens, lang_mask, proprio, noise=None):
        v = self.vis_proj(self.vision(image).flatten(2).transpose(1, 2)).mean(1)
        w = lang_mask[..., None]
        lang = (self.lang_proj(lang_tokens) * w).sum(1) / w.sum(1).clamp(min=1.0)
        h = v + lang + self.proprio_proj(proprio)
        h = h + self.fc2(torch.nn.functional.gelu(self.fc1(h)))
        x = self.queries[None] + h[:, None]
        if self.flow:
            x = x + self.noise_proj(noise)
        return self.head(x)


def example_inputs(flow: bool = True, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(1, L)
    mask[:, :7] = 1.0
    out = {
        "image": torch.rand(1, 3, 128, 128, generator=g),
        "lang_tokens": torch.randn(1, L, D, generator=g) * mask[..., None],
        "lang_mask": mask,
        "proprio": torch.randn(1, 4, generator=g),
    }
    if flow:
        out["noise"] = torch.randn(1, CHUNK, ACT, generator=g)
    return out


def instruction_table(seed: int = 1) -> InstructionTable:
    rng = np.random.default_rng(seed)
    feats = {}
    for i, text in enumerate(INSTRUCTIONS):
        mask = np.zeros(L, np.float32)
        mask[: 4 + i] = 1.0
        feats[text] = (rng.standard_normal((L, D)).astype(np.float32) * mask[:, None], mask)
    return InstructionTable(feats)


def build_artifact(out_dir: Path, flow: bool = True, seed: int = 0) -> tuple[ToyVLA, Path]:
    torch.manual_seed(seed)
    model = ToyVLA(flow=flow).eval()
    export_policy(
        model,
        example_inputs(flow),
        out_dir,
        norm=NORM,
        instructions_cache=instruction_table(),
        config_meta={"name": "toy", "flow": flow},
    )
    return model, out_dir


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    return build_artifact(tmp_path_factory.mktemp("fp32") / "art")


def test_export_writes_artifact(artifact):
    _, out = artifact
    assert sorted(p.name for p in out.iterdir()) == [
        "instructions.safetensors",
        "manifest.json",
        "model.onnx",
    ]
    m = read_manifest(out)
    assert m.model_sha256 == sha256_file(out / "model.onnx")
    assert [s.name for s in m.inputs] == ["image", "lang_tokens", "lang_mask", "proprio", "noise"]
    assert m.input("image").shape == (1, 3, 128, 128) and m.image.size == (128, 128)
    assert [(s.name, s.shape) for s in m.outputs] == [("actions", (1, CHUNK, ACT))]
    assert m.chunk_size == CHUNK and m.action_names == ["dx", "dy", "dz", "gripper"]
    assert m.method == "fp32" and m.flavour == "fp32" and m.opset == 21 and m.exporter == "dynamo"
    assert m.normalization == NORM and m.config["name"] == "toy"
    assert sorted(InstructionTable.load(out / "instructions.safetensors").instructions) == sorted(
        INSTRUCTIONS
    )
    onnx.checker.check_model(str(out / "model.onnx"), full_check=True)


def test_fp32_parity_on_held_out_inputs(artifact):
    import onnxruntime as ort

    model, out = artifact
    sess = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    for seed in (11, 12, 13):
        feeds = example_inputs(seed=seed)
        with torch.no_grad():
            ref = model(**feeds).numpy()
        got = sess.run(None, {k: v.numpy() for k, v in feeds.items()})[0]
        np.testing.assert_allclose(got, ref, atol=1e-4, rtol=0)


def test_regression_head_without_noise_and_legacy_fallback(tmp_path):
    torch.manual_seed(3)
    model = ToyVLA(flow=False).eval()
    m = export_policy(
        model,
        example_inputs(flow=False),
        tmp_path / "reg",
        norm=NORM,
        instructions_cache=instruction_table(),
        prefer_dynamo=False,
    )
    assert m.exporter == "legacy" and m.opset == 20
    assert [s.name for s in m.inputs] == ["image", "lang_tokens", "lang_mask", "proprio"]


def test_export_refuses_bad_inputs(tmp_path):
    model = ToyVLA().eval()
    batch2 = {k: torch.cat([v, v]) for k, v in example_inputs().items()}
    with pytest.raises(ExportError, match="batch size 1"):
        export_policy(model, batch2, tmp_path, norm=NORM, instructions_cache=instruction_table())
    bad_norm = {k: v for k, v in NORM.items() if k != "action_std"}
    with pytest.raises(ExportError, match=r"norm is missing \['action_std'\]"):
        export_policy(
            model, example_inputs(), tmp_path, norm=bad_norm, instructions_cache=instruction_table()
        )
