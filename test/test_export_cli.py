"""`daptq export` on a tiny ReferenceVLA: FP checkpoint and a hand-built quantized checkpoint."""

import json

import numpy as np
import onnx
import pytest
import torch
from safetensors.numpy import save_file
from test_export_fp32 import INSTRUCTIONS, NORM, instruction_table
from test_export_qdq import fake_quant_reference, rtn

from daptq_ros.cli import main
from daptq_ros.export.quantized import float_twin, read_quantized
from daptq_ros.runtime.onnx_policy import OnnxStepPolicy

vla = pytest.importorskip("daptq_ros.model.vla")
io = pytest.importorskip("daptq_ros.model.io")
config_mod = pytest.importorskip("daptq_ros.model.config")

# name -> (bits, group, quantize input)
QUANT = {
    "vision.conv1": (8, 0, True),
    "lang_proj": (8, 0, False),
    "trunk.blocks.0.attn.q_proj": (4, 16, False),
    "trunk.blocks.0.mlp.fc1": (8, 0, True),
    "action_head.blocks.0.mlp.fc1": (4, 16, True),  # called once per flow step
}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    torch.manual_seed(0)
    cfg = config_mod.VLAConfig(d_model=32, heads=2, trunk_layers=1, head_layers=1, head_dim=32, flow_steps=2)
    model = vla.ReferenceVLA(cfg).eval()
    with torch.no_grad():  # adaLN-zero init would make the head ignore its input
        for p in model.action_head.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    fp_path = io.save_checkpoint(
        root / "policy.safetensors", model, io.NormStats.from_dict(NORM), {"instructions": INSTRUCTIONS}
    )
    instruction_table().save(root / "instructions.safetensors")
    q_path, plan = write_quantized(model, fp_path, root / "policy_q.safetensors", QUANT)
    return model, fp_path, q_path, plan, root


def write_quantized(model, fp_path, q_path, quant):
    """A hand-built RTN checkpoint of ``model``: ``quant`` = name -> (bits, group, quantize input)."""
    calib = model.example_inputs(1, seed=9)
    scales = input_scales_for(model, [n for n, (_, _, a) in quant.items() if a], calib)
    plan = [
        rtn(n, model.get_submodule(n).weight, b, g, input_scale=scales.get(n))
        for n, (b, g, _) in quant.items()
    ]
    tensors = {
        k: v.numpy()
        for k, v in model.state_dict().items()
        if not any(k == f"{lq.name}.weight" for lq in plan)
    }
    layers = {}
    for lq in plan:
        tensors[f"{lq.name}.weight_int"] = lq.w_int
        tensors[f"{lq.name}.weight_scale"] = lq.scale
        if lq.input_scale is not None:
            tensors[f"{lq.name}.input_scale"] = np.array(lq.input_scale, np.float32)
        layers[lq.name] = {
            "w_bits": lq.w_bits,
            "group_size": lq.group_size,
            "symmetric": True,
            "a_bits": lq.a_bits,
            "act_granularity": "tensor",
        }
    layers["proprio_proj"] = {
        "w_bits": 16,
        "group_size": 0,
        "symmetric": True,
        "a_bits": 16,
        "act_granularity": "tensor",
    }
    meta = {
        "method": "rtn",
        "recipe": {"budget": 6.0},
        "avg_bits": 7.5,
        "layers": layers,
        "base": io.read_metadata(fp_path)["daptq.checkpoint"],
    }
    save_file(tensors, str(q_path), metadata={"daptq.quant": json.dumps(meta)})
    return q_path, plan


def input_scales_for(model, names, feeds):
    amax, hooks = {}, []
    for name in names:
        hooks.append(
            model.get_submodule(name).register_forward_pre_hook(
                lambda m, a, n=name: amax.__setitem__(n, max(amax.get(n, 0.0), float(a[0].abs().max())))
            )
        )
    with torch.no_grad():
        model(**feeds)
    for h in hooks:
        h.remove()
    return {n: v / 127.0 for n, v in amax.items()}


def test_export_fp_checkpoint(checkpoints, tmp_path):
    model, fp_path, _, _, _ = checkpoints
    out = tmp_path / "fp"
    assert (
        main(["export", "--checkpoint", str(fp_path), "--out", str(out), "--json", str(tmp_path / "s.json")])
        == 0
    )
    assert json.loads((tmp_path / "s.json").read_text())["method"] == "fp32"
    policy = OnnxStepPolicy(out, threads=1, allow_encode=False)
    feeds = model.example_inputs(1, seed=4)
    tokens, mask = policy.instructions.lookup(INSTRUCTIONS[0])
    feeds["lang_tokens"], feeds["lang_mask"] = torch.from_numpy(tokens[None]), torch.from_numpy(mask[None])
    with torch.no_grad():
        ref = model(**feeds).numpy()
    got = policy.session.run({k: v.numpy() for k, v in feeds.items()})["actions"]
    np.testing.assert_allclose(got, ref, atol=1e-4)


def test_export_quantized_checkpoint(checkpoints, tmp_path):
    model, _, q_path, plan, _ = checkpoints
    out = tmp_path / "q"
    assert main(["export", "--quantized", str(q_path), "--out", str(out), "--flavour", "trt"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["method"] == "rtn" and manifest["budget"] == 6.0 and manifest["avg_bits"] == 7.5
    assert set(manifest["layers"]) == set(QUANT)
    proto = onnx.load(str(out / "model.onnx"))
    ops = [n.op_type for n in proto.graph.node]
    # 5 weight DQs; activations: conv1, trunk fc1, and head fc1 once per flow step (2 steps).
    assert ops.count("DequantizeLinear") == 5 + 4 and ops.count("QuantizeLinear") == 4
    twin = float_twin(read_quantized(q_path))
    ref_model = fake_quant_reference(model, plan)
    for name, _ in twin.named_parameters():
        np.testing.assert_array_equal(twin.state_dict()[name].numpy(), ref_model.state_dict()[name].numpy())
    policy = OnnxStepPolicy(out, threads=1, allow_encode=False)
    feeds = model.example_inputs(1, seed=5)
    with torch.no_grad():
        ref = ref_model(**feeds).numpy()
    got = policy.session.run({k: v.numpy() for k, v in feeds.items()})["actions"]
    assert np.linalg.norm(got - ref) / np.linalg.norm(ref) < 3e-2


def test_export_quantized_checkpoint_cpu_flavour(checkpoints, tmp_path):
    """CPU flavour of the same checkpoint: integer kernels, no runtime DequantizeLinear, same numbers."""
    from daptq_ros.runtime.bench import runtime_op_counts

    model, _, q_path, plan, _ = checkpoints
    out = tmp_path / "cpu"
    assert main(["export", "--quantized", str(q_path), "--out", str(out), "--flavour", "cpu"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["flavour"] == "cpu"
    assert {n: e["kernel"] for n, e in manifest["layers"].items()} == {
        "vision.conv1": "conv_int",  # static int8 input scale; 3 input channels: ConvInteger
        "lang_proj": "dynamic",  # weight-only per channel
        "trunk.blocks.0.attn.q_proj": "nbits",  # grouped (16)
        "trunk.blocks.0.mlp.fc1": "int8",  # static int8 activations, per channel
        "action_head.blocks.0.mlp.fc1": "nbits",  # grouped; its static scale is not used
    }
    assert manifest["layers"]["action_head.blocks.0.mlp.fc1"]["a_bits_quantizer"] == 8
    ran = runtime_op_counts(out)
    assert "DequantizeLinear" not in ran and ran["ConvInteger"] == 1
    # flow head fc1 runs once per flow step (2 steps), all over one initializer
    assert ran["MatMulNBits"] == 1 + 2 and ran["DynamicQuantizeMatMul"] == 1
    assert ran["MatMulIntegerToFloat"] == 1  # trunk fc1
    policy = OnnxStepPolicy(out, threads=1, allow_encode=False)
    feeds = model.example_inputs(1, seed=5)
    with torch.no_grad():
        ref = fake_quant_reference(model, plan).eval()(**feeds).numpy()
    got = policy.session.run({k: v.numpy() for k, v in feeds.items()})["actions"]
    assert np.linalg.norm(got - ref) / np.linalg.norm(ref) < 3e-2
    exact = tmp_path / "cpu_exact"  # float compute where activations were not statically quantized
    args = [
        "--cpu-weight-only",
        "float",
        "--cpu-accuracy-level",
        "0",
        "--cpu-conv",
        "float",
        "--cpu-u8-weights",
    ]
    assert main(["export", "--quantized", str(q_path), "--out", str(exact), "--flavour", "cpu", *args]) == 0
    layers = json.loads((exact / "manifest.json").read_text())["layers"]
    assert layers["lang_proj"]["kernel"] == "float" and layers["vision.conv1"]["kernel"] == "float"
    assert json.loads((exact / "manifest.json").read_text())["config"]["cpu_options"]["u8_weights"] is True


def test_export_refusals(checkpoints, tmp_path):
    _, fp_path, q_path, _, root = checkpoints
    assert main(["export", "--checkpoint", str(root / "missing.safetensors"), "--out", str(tmp_path)]) == 2
    assert (
        main(["export", "--quantized", str(fp_path), "--out", str(tmp_path / "a")]) == 2
    )  # FP, not quantized
    assert (
        main(["export", "--checkpoint", str(q_path), "--out", str(tmp_path / "b")]) == 2
    )  # quantized, not FP
    assert not (tmp_path / "a" / "model.onnx").exists()


@pytest.mark.parametrize("flavour", ["trt", "cpu"])
def test_input_independent_layers_are_folded_not_refused(checkpoints, tmp_path, flavour):
    """The flow head's time MLP sees only the fixed integration times: the exporter folds it into
    constants (from the dequantized weights), so a plan quantizing it must still export."""
    from daptq_ros.export.quantized import input_independent_layers

    model, fp_path, _, _, _ = checkpoints
    time_mlp = {"action_head.time_fc1": (8, 0, True), "action_head.time_fc2": (4, 16, False)}
    # The one-block trunk's last block queries only the learned readout tokens: its q_proj input is
    # input-independent too, but it stays in the graph (LayerNorm runs on all tokens before the
    # slice), so only the time MLP is folded.
    assert input_independent_layers(model, [*QUANT, *time_mlp]) == {*time_mlp, "trunk.blocks.0.attn.q_proj"}
    q_path, plan = write_quantized(model, fp_path, tmp_path / "q.safetensors", {**QUANT, **time_mlp})
    out = tmp_path / flavour
    assert main(["export", "--quantized", str(q_path), "--out", str(out), "--flavour", flavour]) == 0
    layers = json.loads((out / "manifest.json").read_text())["layers"]
    assert {n for n, e in layers.items() if e.get("kernel") == "folded"} == set(time_mlp)
    time_fc1 = layers["action_head.time_fc1"]
    assert time_fc1["a_bits"] == 16 and time_fc1["a_bits_quantizer"] == 8  # folded with float inputs
    policy = OnnxStepPolicy(out, threads=1, allow_encode=False)
    feeds = model.example_inputs(1, seed=5)
    with torch.no_grad():  # folded from the dequantized weights: same numbers as the fake-quant model
        ref = fake_quant_reference(model, plan).eval()(**feeds).numpy()
    got = policy.session.run({k: v.numpy() for k, v in feeds.items()})["actions"]
    assert np.linalg.norm(got - ref) / np.linalg.norm(ref) < 3e-2


def test_a_layer_missing_for_another_reason_is_still_refused(checkpoints, tmp_path):
    from daptq_ros.export.qdq import ExportError, match_layers

    _, _, q_path, plan, _ = checkpoints
    out = tmp_path / "q"
    assert main(["export", "--quantized", str(q_path), "--out", str(out)]) == 0
    model = onnx.load(str(out / "model.onnx"))
    ghost = {**{lq.name: lq for lq in plan}, "action_head.ghost": plan[0]}
    with pytest.raises(ExportError, match=r"action_head\.ghost.*not found"):
        match_layers(model, ghost, folded={"action_head.time_fc1"})
