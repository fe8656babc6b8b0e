"""QDQ export vs the torch fake-quant computation built from the same integers and scales."""

import copy
import dataclasses

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from test_export_fp32 import build_artifact, example_inputs

from daptq_ros.export.cpu import CpuOptions, nbits_block_size, pack_nbits
from daptq_ros.export.onnx_export import ExportError
from daptq_ros.export.qdq import LayerQuant, compress_constant_grids, export_qdq, rewrite_qdq
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


def runtime_ops(path):
    """Op counts of the graph ORT-CPU actually runs (after its optimizations, constant folding)."""
    from daptq_ros.runtime.bench import runtime_op_counts

    return runtime_op_counts(path)


def weight_only(plan):
    return [dataclasses.replace(lq, input_scale=None) for lq in plan]


def test_shared_weight_dq_is_not_fused_by_ort_but_cpu_kernels_are(tmp_path):
    """Why the CPU flavour exists: a weight DQ feeding several MatMuls (a Linear called at every flow
    step) is neither fused nor constant-folded by ORT-CPU, so it dequantizes at every inference."""
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
    lq = rtn("lin", model.lin.weight, 4, 16)
    for flavour in ("trt", "cpu"):
        proto = onnx.load(str(tmp_path / "t.onnx"))
        rewrite_qdq(proto, [lq], flavour=flavour)
        (tmp_path / flavour).mkdir()
        onnx.save(proto, str(tmp_path / flavour / "model.onnx"))
    trt, cpu = runtime_ops(tmp_path / "trt"), runtime_ops(tmp_path / "cpu")
    assert trt.get("DequantizeLinear", 0) >= 1 and "MatMulNBits" not in trt
    assert cpu["MatMulNBits"] == 2 and "DequantizeLinear" not in cpu
    with torch.no_grad():
        ref = fake_quant_reference(model, [lq])(x).numpy()
    for flavour in ("trt", "cpu"):
        got = ort_run(tmp_path / flavour / "model.onnx", {"x": x.numpy()}, disable_all=False)
        assert rel_err(got, ref) < 2e-2


def test_cpu_weight_only_kernels(fp, tmp_path):
    model, path = fp
    groups = {"lang_proj": 32, "fc1": 16, "fc2": 24, "head": 16, "vis_proj": 0}  # fc2: ragged last block
    plan = [rtn(n, model.get_submodule(n).weight, 4, g) for n, g in groups.items()]
    m = export_qdq(path, plan, tmp_path / "w4", flavour="cpu", method="rtn")
    proto, counts, types = op_counts(tmp_path / "w4" / "model.onnx")
    kernels = {n: e["kernel"] for n, e in m.layers.items()}
    assert kernels == {
        "lang_proj": "nbits",
        "fc1": "nbits",
        "head": "nbits",
        "vis_proj": "dynamic",
        "fc2": "dq",
    }
    assert (
        counts["MatMulNBits"] == 3
        and counts["DynamicQuantizeMatMul"] == 1
        and counts["DequantizeLinear"] == 1
    )
    nbits = {
        n.name: {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}
        for n in proto.graph.node
        if n.op_type == "MatMulNBits"
    }
    assert sorted((a["K"], a["N"], a["bits"], a["block_size"]) for a in nbits.values()) == [
        (32, 4, 4, 16),
        (32, 64, 4, 16),
        (384, 32, 4, 32),
    ]
    assert all(a["accuracy_level"] == 4 for a in nbits.values())
    prefix = m.config["cpu_tensor_prefixes"]["vis_proj"]
    assert types[f"{prefix}.wkn.i4"] == onnx.TensorProto.INT4  # 4-bit storage, int8 after folding
    ran = runtime_ops(tmp_path / "w4")
    assert ran["MatMulNBits"] == 3 and ran["DynamicQuantizeMatMul"] == 1
    assert ran["DequantizeLinear"] == 1 and "Cast" not in ran  # only the ragged fc2; INT4 Cast folded
    assert m.layers["fc2"] == {
        "w_bits": 4,
        "group_size": 24,
        "a_bits": 16,
        "symmetric": True,
        "storage": "int4",
        "kernel": "dq",
    }
    assert m.layers["vis_proj"]["act_granularity"] == "dynamic_tensor"
    assert m.layers["lang_proj"]["act_granularity"] == "dynamic_block"
    # int8 compute (accuracy level 4, run-time activation scales): close to the weight-only math
    check_parity(model, plan, tmp_path / "w4", tol_exact=2e-2, tol_fused=2e-2)
    # float compute + folded float weights: the quantizer's weight-only math exactly
    exact = CpuOptions(weight_only="float", accuracy_level=0)
    m = export_qdq(path, plan, tmp_path / "w4x", flavour="cpu", method="rtn", cpu_options=exact)
    assert m.layers["vis_proj"]["kernel"] == "float" and "act_granularity" not in m.layers["lang_proj"]
    assert "DequantizeLinear" not in runtime_ops(tmp_path / "w4x").keys() - {"DequantizeLinear"}
    check_parity(model, plan, tmp_path / "w4x", tol_exact=1e-4, tol_fused=1e-4)


@pytest.mark.parametrize("u8", [False, True])
def test_cpu_static_int8_kernels_and_low_bit_storage(fp, tmp_path, u8):
    """W(2..8)A8 with the quantizer's activation scales: integer kernels (U8S8, or U8U8 with
    ``u8_weights``), bit-exact storage."""
    model, path = fp
    scales = input_scales(model, ALL_LAYERS)
    bits = {
        "vision.0": 8,
        "vis_proj": 3,
        "lang_proj": 2,
        "proprio_proj": 8,
        "fc1": 4,
        "fc2": 8,
        "noise_proj": 3,
        "head": 4,
    }
    plan = [
        rtn(
            n,
            model.get_submodule(n).weight,
            b,
            input_scale=scales[n],
            zero_rows=(1,) if n == "lang_proj" else (),
        )
        for n, b in bits.items()
    ]
    options = CpuOptions(u8_weights=u8)
    m = export_qdq(path, plan, tmp_path / "q", flavour="cpu", method="rtn", cpu_options=options)
    # the RGB stem conv has 3 input channels: ConvInteger (im2col only pays off from 16 channels)
    assert {n: e["kernel"] for n, e in m.layers.items()} == {n: "int8" for n in bits} | {
        "vision.0": "conv_int"
    }
    assert all(e["a_bits"] == 8 and e["act_granularity"] == "tensor" for e in m.layers.values())
    proto, counts, types = op_counts(tmp_path / "q" / "model.onnx")
    assert "DequantizeLinear" not in counts and "Gemm" not in counts
    assert counts["QuantizeLinear"] == 8
    # storage: 2/3-bit layers as packed uint8 bit planes, 4-bit as INT4, 8-bit as INT8
    inits = {i.name: i for i in proto.graph.initializer}
    prefix = m.config["cpu_tensor_prefixes"]
    planes = lambda n: [i for name, i in inits.items() if name.startswith(f"{prefix[n]}.wkn.p")]  # noqa: E731
    assert [len(p.raw_data) for p in planes("lang_proj")] == [384 * 32 * 2 // 8]
    assert sorted(len(p.raw_data) for p in planes("vis_proj")) == [8 * 32 // 8, 8 * 32 * 2 // 8]
    assert types[f"{prefix['fc1']}.wkn.i4"] == onnx.TensorProto.INT4
    assert types[f"{prefix['fc2']}.wkn.i8"] == onnx.TensorProto.INT8
    assert not any(
        i.data_type == onnx.TensorProto.FLOAT and len(i.dims) == 2 and i.dims[0] * i.dims[1] >= 256
        for i in proto.graph.initializer
    )  # no float weight copies
    ran = runtime_ops(tmp_path / "q")
    unpack = {"BitShift", "BitwiseAnd", "BitwiseOr", "Slice", "Sub"} & ran.keys()
    assert ran["MatMulIntegerToFloat"] == 7 and not unpack - {"Slice"}  # weight unpacking folded at load
    assert ran["ConvInteger"] == 1 and "DequantizeLinear" not in ran
    check_parity(model, plan, tmp_path / "q", tol_exact=2e-3, tol_fused=2e-3)


class _Stem(torch.nn.Module):
    """Conv stem with >= 16 channels (im2col path): stride-2 conv, GELU, residual stride-1 conv."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = torch.nn.Conv2d(16, 24, 3, stride=2, padding=1)
        self.conv2 = torch.nn.Conv2d(24, 24, 3, stride=1, padding=1)

    def forward(self, x):
        h = torch.nn.functional.gelu(self.conv1(x))
        h = h + torch.nn.functional.gelu(self.conv2(h))
        return h.flatten(2).transpose(1, 2)


def test_cpu_conv_im2col_matches_conv_integer(tmp_path):
    """im2col (Gather or Slices) + U8S8 GEMM computes the same integers as ConvInteger."""
    torch.manual_seed(0)
    model = _Stem().eval()
    x = torch.randn(1, 16, 20, 20)
    torch.onnx.export(
        model,
        (x,),
        str(tmp_path / "t.onnx"),
        dynamo=True,
        opset_version=21,
        input_names=["x"],
        output_names=["y"],
    )
    amax = {}
    hooks = [
        model.get_submodule(n).register_forward_pre_hook(
            lambda m, a, n=n: amax.__setitem__(n, float(a[0].abs().max()))
        )
        for n in ("conv1", "conv2")
    ]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    plan = [
        rtn(n, model.get_submodule(n).weight, b, input_scale=amax[n] / 127)
        for n, b in (("conv1", 8), ("conv2", 3))
    ]
    with torch.no_grad():
        ref = fake_quant_reference(model, plan)(x).numpy()
    outs = {}
    for name, options in {
        "gather": CpuOptions(),
        "slices": CpuOptions(im2col="slices"),
        "integer": CpuOptions(conv="integer"),
    }.items():
        proto = onnx.load(str(tmp_path / "t.onnx"))
        kernels: dict = {}
        rewrite_qdq(proto, plan, flavour="cpu", cpu_options=options, kernels=kernels)
        assert set(kernels.values()) == {"conv_int" if name == "integer" else "conv_im2col"}
        onnx.checker.check_model(proto, full_check=True)
        (tmp_path / name).mkdir()
        onnx.save(proto, str(tmp_path / name / "model.onnx"))
        ran = runtime_ops(tmp_path / name)
        if name != "integer":
            assert "ConvInteger" not in ran and ran["MatMulIntegerToFloat"] == 2
            assert ran.get("Transpose", 0) <= 4  # 2 per conv + 1 of the model, minus cancelled pairs
            assert ran.get("Gather", 0) == (2 if name == "gather" else 0)
        outs[name] = ort_run(tmp_path / name / "model.onnx", {"x": x.numpy()}, disable_all=False)
    for name in ("slices", "integer"):
        np.testing.assert_allclose(outs[name], outs["gather"], rtol=1e-5, atol=1e-5)
    assert rel_err(outs["gather"], ref) < 1e-4


def test_nbits_packing_matches_dequantize():
    """MatMulNBits tensors from our packer reproduce x @ dequantize(W).T (bits 2/4/8, zero points)."""
    rng = np.random.default_rng(0)
    for bits, k, group, zero in [(4, 80, 16, False), (4, 96, 32, True), (2, 64, 0, False), (8, 72, 0, True)]:
        n = 12
        q = rng.integers(-(2 ** (bits - 1)), 2 ** (bits - 1), (n, k)).astype(np.int8)
        ng = 1 if group == 0 else -(-k // group)
        z = rng.integers(-2, 2, (n, ng)).astype(np.int8) if zero else None
        lq = LayerQuant("l", q, rng.random((n, ng)).astype(np.float32) + 0.1, bits, group, zero=z)
        block = nbits_block_size(lq, k)
        packed, scales, zp = pack_nbits(lq, bits, block)
        node = onnx.helper.make_node(
            "MatMulNBits",
            ["x", "b", "s", "z" if zp is not None else ""],
            ["y"],
            domain="com.microsoft",
            K=k,
            N=n,
            bits=bits,
            block_size=block,
            accuracy_level=0,
        )
        inits = [onnx.numpy_helper.from_array(packed, "b"), onnx.numpy_helper.from_array(scales, "s")]
        if zp is not None:
            inits.append(onnx.numpy_helper.from_array(zp, "z"))
        graph = onnx.helper.make_graph(
            [node],
            "g",
            [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [3, k])],
            [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [3, n])],
            inits,
        )
        proto = onnx.helper.make_model(
            graph,
            opset_imports=[onnx.helper.make_opsetid("", 21), onnx.helper.make_opsetid("com.microsoft", 1)],
        )
        x = rng.standard_normal((3, k)).astype(np.float32)
        sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
        np.testing.assert_allclose(sess.run(None, {"x": x})[0], x @ lq.dequantize().T, rtol=1e-4, atol=1e-4)


def test_compress_constant_grids_is_lossless():
    """A CoordConv grid (x along W, y along H) is stored as two vectors and rebuilt at load."""
    lin = np.linspace(-1, 1, 64, dtype=np.float32)
    yy, xx = np.meshgrid(lin, lin, indexing="ij")
    grid = np.stack([xx, yy])[None].astype(np.float32)
    node = onnx.helper.make_node("Add", ["x", "coords"], ["y"])
    graph = onnx.helper.make_graph(
        [node],
        "g",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 2, 64, 64])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 2, 64, 64])],
        [onnx.numpy_helper.from_array(grid, "coords")],
    )
    proto = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 21)])
    before = proto.ByteSize()
    assert compress_constant_grids(proto) == 1 and proto.ByteSize() < before // 20
    onnx.checker.check_model(proto, full_check=True)
    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    x = np.zeros((1, 2, 64, 64), np.float32)
    np.testing.assert_array_equal(sess.run(None, {"x": x})[0], grid)
    noisy = grid + np.random.default_rng(0).standard_normal(grid.shape).astype(np.float32)
    proto.graph.initializer.append(onnx.numpy_helper.from_array(noisy, "other"))
    assert compress_constant_grids(proto) == 0  # not separable: kept as is


def test_cpu_shared_layer_one_initializer(tmp_path):
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
    lq = rtn("lin", model.lin.weight, 4, input_scale=float(x.abs().max()) / 127)
    kernels: dict = {}
    counts = rewrite_qdq(proto, [lq], flavour="cpu", kernels=kernels)
    assert (
        kernels == {"lin": "int8"} and counts["MatMulIntegerToFloat"] == 2 and counts["QuantizeLinear"] == 2
    )
    ops = [n.op_type for n in proto.graph.node]
    assert ops.count("Cast") == 1 and "Transpose" not in ops and "Add" not in ops  # bias folded
    onnx.checker.check_model(proto, full_check=True)
    onnx.save(proto, str(tmp_path / "q.onnx"))
    with torch.no_grad():
        ref = fake_quant_reference(model, [lq])(x).numpy()
    got = ort_run(tmp_path / "q.onnx", {"x": x.numpy()}, disable_all=False)
    assert rel_err(got, ref) < 1e-4


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
