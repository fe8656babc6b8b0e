"""QDQ export vs the torch fake-quant computation built from the same integers and scales."""

import copy

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from test_export_fp32 import build_artifact, example_inputs

from daptq_ros.export.onnx_export import ExportError
from daptq_ros.export.qdq import LayerQuant, export_qdq, rewrite_qdq
from daptq_ros.runtime.manifest import read_manifest
from daptq_ros.runtime.session import PolicySession

ALL_LAYERS = ["vision.0", "vis_proj", "lang_proj", "proprio_proj", "fc1", "fc2", "noise_proj", "head"]


@pytest.fixture(scope="module")
def fp(tmp_path_factory):
    model, path = build_artifact(tmp_path_factory.mktemp("qdq") / "fp32", seed=4)
    return model, path


def rtn(name, weight, bits, group=0, zero_rows=(), input_scale=None):
    """Symmetric round-to-nearest integers/scales for ``weight`` (the quantizer's grid)."""
    w = weight.detach().numpy().astype(np.float32)
    flat = w.reshape(w.shape[0], -1)
    k = flat.shape[1]
    g = k if group == 0 else group
    ng = -(-k // g)
    qmax = 2 ** (bits - 1) - 1
    scale = np.ones((flat.shape[0], ng), np.float32)
    q = np.zeros_like(flat, dtype=np.int8)
    for j in range(ng):
        blk = flat[:, j * g : (j + 1) * g]
        s = np.maximum(np.abs(blk).max(1), 1e-8) / qmax
        scale[:, j] = s
        q[:, j * g : (j + 1) * g] = np.clip(np.round(blk / s[:, None]), -qmax - 1, qmax)
    channel_bits = None
    if zero_rows:
        q[list(zero_rows)] = 0
        scale[list(zero_rows)] = 1.0
        channel_bits = [0 if r in zero_rows else bits for r in range(flat.shape[0])]
    return LayerQuant(
        name, q.reshape(w.shape), scale, bits, group, input_scale=input_scale, channel_bits=channel_bits
    )


def input_scales(model, names):
    """Per-tensor int8 scales (amax / 127) of each layer's input on a calibration batch."""
    amax, hooks = {}, []
    for name in names:
        mod = model.get_submodule(name)
        hooks.append(
            mod.register_forward_pre_hook(
                lambda m, args, n=name: amax.__setitem__(n, float(args[0].abs().max()))
            )
        )
    with torch.no_grad():
        model(**example_inputs(seed=100))
    for h in hooks:
        h.remove()
    return {n: amax[n] / 127.0 for n in names}


def fake_quant_reference(model, plan):
    """Torch model computing exactly W_dq = w_int * scale and int8 Q/DQ of the inputs."""
    ref = copy.deepcopy(model)
    for lq in plan:
        mod = ref.get_submodule(lq.name)
        mod.weight.data.copy_(torch.from_numpy(lq.dequantize()))
        if lq.input_scale is not None:
            s = lq.input_scale
            mod.register_forward_pre_hook(
                lambda m, args, s=s: (torch.clamp(torch.round(args[0] / s), -128, 127) * s, *args[1:])
            )
    return ref


def ort_run(path, feeds, disable_all):
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    if disable_all:
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(
        str(path), opts, providers=["CPUExecutionProvider"], disabled_optimizers=["QDQS8ToU8Transformer"]
    )
    return sess.run(None, feeds)[0]


def rel_err(a, b):
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def check_parity(model, plan, out_dir, tol_exact, tol_fused):
    ref_model = fake_quant_reference(model, plan)
    for seed in (21, 22):
        feeds = example_inputs(seed=seed)
        with torch.no_grad():
            ref = ref_model(**feeds).numpy()
            fp = model(**feeds).numpy()
        np_feeds = {k: v.numpy() for k, v in feeds.items()}
        exact = ort_run(out_dir / "model.onnx", np_feeds, disable_all=True)
        fused = ort_run(out_dir / "model.onnx", np_feeds, disable_all=False)
        assert rel_err(exact, ref) < tol_exact, rel_err(exact, ref)
        assert rel_err(fused, ref) < tol_fused, rel_err(fused, ref)
        assert rel_err(ref, fp) > 10 * rel_err(exact, ref)  # quantization is visible, export is not


def op_counts(path):
    model = onnx.load(str(path))
    counts = {}
    for n in model.graph.node:
        counts[n.op_type] = counts.get(n.op_type, 0) + 1
    types = {i.name: i.data_type for i in model.graph.initializer}
    return model, counts, types


def test_w8a8_trt(fp, tmp_path):
    model, path = fp
    scales = input_scales(model, ALL_LAYERS)
    plan = [rtn(n, model.get_submodule(n).weight, 8, input_scale=scales[n]) for n in ALL_LAYERS]
    m = export_qdq(path, plan, tmp_path / "w8a8", flavour="trt", method="rtn", budget=8.0)
    onnx.checker.check_model(str(tmp_path / "w8a8" / "model.onnx"), full_check=True)
    _, counts, types = op_counts(tmp_path / "w8a8" / "model.onnx")
    assert counts["QuantizeLinear"] == 8 and counts["DequantizeLinear"] == 16
    assert "Gemm" not in counts  # quantized Gemms became MatMul + Add
    assert all(types[f"{n}.weight_quantized"] == onnx.TensorProto.INT8 for n in ALL_LAYERS)
    assert not any(
        name.endswith(".weight") for name in types if name.startswith("fc")
    )  # float copies dropped
    assert m.flavour == "trt" and m.avg_bits == pytest.approx(8.0) and m.layers["fc1"]["a_bits"] == 8
    check_parity(model, plan, tmp_path / "w8a8", tol_exact=2e-3, tol_fused=3e-2)
    sess = PolicySession(tmp_path / "w8a8", threads=1)  # S8 QDQ loads with QDQS8ToU8 disabled
    sess.run({k: v.numpy() for k, v in example_inputs(seed=3).items()})


def test_int4_blocked_weight_only(fp, tmp_path):
    model, path = fp
    groups = {"lang_proj": 32, "fc1": 16, "fc2": 24, "head": 16, "vis_proj": 0}  # fc2: ragged last block
    plan = [rtn(n, model.get_submodule(n).weight, 4, g) for n, g in groups.items()]
    m = export_qdq(path, plan, tmp_path / "w4", flavour="cpu", method="rtn")
    proto, counts, types = op_counts(tmp_path / "w4" / "model.onnx")
    assert counts.get("QuantizeLinear", 0) == 0 and counts["DequantizeLinear"] == 5
    assert all(types[f"{n}.weight_quantized"] == onnx.TensorProto.INT4 for n in groups)
    dq = {
        n.name: {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}
        for n in proto.graph.node
        if n.op_type == "DequantizeLinear"
    }
    assert dq["lang_proj.weight_DequantizeLinear"] == {"axis": 0, "block_size": 32}
    assert dq["vis_proj.weight_DequantizeLinear"] == {"axis": 1}
    assert m.layers["fc2"] == {
        "w_bits": 4,
        "group_size": 24,
        "a_bits": 16,
        "symmetric": True,
        "storage": "int4",
    }
    check_parity(model, plan, tmp_path / "w4", tol_exact=1e-4, tol_fused=2e-2)  # MatMulNBits: int8 compute


def test_mixed_precision_with_pruned_rows(fp, tmp_path):
    model, path = fp
    scales = input_scales(model, ["vision.0", "fc1"])
    plan = [
        rtn("vision.0", model.vision[0].weight, 8, input_scale=scales["vision.0"]),
        rtn("lang_proj", model.lang_proj.weight, 4, 32),
        rtn("fc1", model.fc1.weight, 8, input_scale=scales["fc1"]),
        rtn("fc2", model.fc2.weight, 2, 16, zero_rows=(0, 5)),
    ]
    m = export_qdq(path, plan, tmp_path / "mixed", flavour="trt", method="daptq", budget=6.0)
    _, counts, types = op_counts(tmp_path / "mixed" / "model.onnx")
    assert counts["QuantizeLinear"] == 2 and counts["DequantizeLinear"] == 6
    assert types["fc2.weight_quantized"] == onnx.TensorProto.INT4
    assert counts["Gemm"] == 1  # proprio_proj stays float
    assert m.layers["fc2"]["channel_bits"][:6] == [0, 2, 2, 2, 2, 0]
    assert 4.0 < m.avg_bits < 16.0
    check_parity(model, plan, tmp_path / "mixed", tol_exact=2e-3, tol_fused=3e-2)
    assert read_manifest(tmp_path / "mixed").method == "daptq"


def test_refusals(fp, tmp_path):
    model, path = fp
    with pytest.raises(ExportError, match=r"not found in the ONNX graph"):
        export_qdq(path, [rtn("nope", model.fc1.weight, 8)], tmp_path / "x")
    bad = rtn("fc1", model.fc2.weight, 8)  # fc2's weight shape on fc1's node
    with pytest.raises(ExportError, match="layer fc1: Gemm B"):
        export_qdq(path, [bad], tmp_path / "x")
    with pytest.raises(ValueError, match="outside the 4-bit range"):
        LayerQuant("fc1", np.full((64, 32), 9, np.int8), np.ones((64, 1), np.float32), 4)
    with pytest.raises(ValueError, match=r"scale shape \(64, 1\), expected \(64, 2\)"):
        LayerQuant("fc1", np.zeros((64, 32), np.int8), np.ones((64, 1), np.float32), 4, group_size=16)
    legacy = onnx.load(str(path / "model.onnx"))
    legacy.opset_import[0].version = 17
    with pytest.raises(ExportError, match="opset >= 21"):
        rewrite_qdq(legacy, [rtn("fc1", model.fc1.weight, 8)])


class _Twice(torch.nn.Module):
    """One Linear applied at two steps (like the flow head): two MatMuls share one weight."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(32, 32)

    def forward(self, x):
        return self.lin(torch.tanh(self.lin(x)))


def test_layer_called_twice_shares_one_weight_dq(tmp_path):
    torch.manual_seed(0)
    model = _Twice().eval()
    x = torch.randn(1, 8, 32)
    torch.onnx.export(
        model,
        (x,),
        str(tmp_path / "t.onnx"),
        dynamo=True,
        opset_version=21,
        input_names=["x"],
        output_names=["y"],
    )
    proto = onnx.load(str(tmp_path / "t.onnx"))
    lq = rtn("lin", model.lin.weight, 8, input_scale=float(x.abs().max()) / 127)
    counts = rewrite_qdq(proto, [lq])
    assert counts == {"DequantizeLinear": 3, "QuantizeLinear": 2}  # one weight DQ, two activation pairs
    assert "Transpose" not in [n.op_type for n in proto.graph.node]
    onnx.checker.check_model(proto, full_check=True)
    onnx.save(proto, str(tmp_path / "q.onnx"))
    with torch.no_grad():
        ref = fake_quant_reference(model, [lq])(x).numpy()
    got = ort_run(tmp_path / "q.onnx", {"x": x.numpy()}, disable_all=True)
    assert rel_err(got, ref) < 1e-3
