"""Rewrite an FP32 policy graph into a quantized graph carrying the quantizer's own integers and scales.

Two flavours from the same plan (:class:`LayerQuant` per layer, matched to MatMul/Gemm/Conv nodes
by module name):

``trt`` -- standard QDQ following TensorRT's explicit-quantization rules (for Jetson/TensorRT):

- int8 weights: INT8 initializer -> ``DequantizeLinear`` per output channel (symmetric, zp 0);
- 2..4-bit weights (stored in INT4): INT4 initializer -> blocked ``DequantizeLinear`` (axis 0,
  ``block_size`` = group size, blocks along K of MatMul ``B[K, N]``) -- TensorRT's INT4
  weight-only layout;
- int8 activations: ``QuantizeLinear -> DequantizeLinear`` with the quantizer's scalar scale (zp 0)
  on the node's data input;
- float layers untouched; 0-bit channels are zero integers (bias kept).
  Quantized ``Gemm(transB=1)`` nodes become ``MatMul(x, DQ(W^T)) + Add(bias)``.

  On ORT-CPU this graph runs every DequantizeLinear at every inference and then the float op
  (S8 activations are not fused on x86, shared flow-head weights never are): 3.5x *slower* than
  FP32 (docs/cpu_latency.md). Use it for TensorRT only.

``cpu`` -- ORT-CPU integer kernels (MatMulIntegerToFloat, ConvInteger/im2col, MatMulNBits, ...)
with the same integers and scales: :mod:`daptq_ros.export.cpu`.
"""

from __future__ import annotations

import ast
import dataclasses
import json
import logging
import math
from collections import defaultdict
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
import onnx
from onnx import helper, numpy_helper

from daptq_ros.export.onnx_export import ExportError, check_model, set_model_metadata, strip_debug_metadata
from daptq_ros.runtime.manifest import (
    INSTRUCTIONS_NAME,
    MODEL_NAME,
    Manifest,
    read_manifest,
    sha256_file,
    write_manifest,
)

logger = logging.getLogger(__name__)

QDQ_OPSET = 21  # INT4 and DequantizeLinear.block_size
FLAVOURS = ("trt", "cpu")
FLOAT_BITS = 16


@dataclass
class LayerQuant:
    """One quantized layer as the exporter needs it.

    Attributes:
        name: torch module name (``trunk.blocks.0.attn.q_proj``).
        w_int: b-bit integers in int8 storage, (out, in) or conv (out, in, kh, kw).
        scale: float32 (out, n_groups); n_groups = ceil(in_flat / group_size) or 1.
        w_bits: weight bits (2, 3, 4 or 8; with ``channel_bits`` the maximum).
        group_size: input-dim group size, 0 = per output channel.
        zero: optional int8 zero points (out, n_groups) (asymmetric grids; not TensorRT-legal).
        input_scale: int8 symmetric per-tensor activation scale (None = float input).
        channel_bits: optional per-output-channel bits (0 = pruned row).
    """

    name: str
    w_int: np.ndarray
    scale: np.ndarray
    w_bits: int
    group_size: int = 0
    zero: np.ndarray | None = None
    input_scale: float | None = None
    channel_bits: list[int] | None = field(default=None)

    def __post_init__(self) -> None:
        self.w_int = np.asarray(self.w_int)
        self.scale = np.asarray(self.scale, dtype=np.float32)
        if self.w_bits not in (2, 3, 4, 8):
            raise ValueError(f"layer {self.name}: w_bits must be 2, 3, 4 or 8, got {self.w_bits}")
        if self.w_int.ndim not in (2, 4):
            raise ValueError(
                f"layer {self.name}: w_int must be (out, in) or (out, in, kh, kw), got {self.w_int.shape}"
            )
        out, in_flat = self.w_int.shape[0], int(np.prod(self.w_int.shape[1:]))
        ng = 1 if self.group_size <= 0 else math.ceil(in_flat / self.group_size)
        if self.scale.shape != (out, ng):
            raise ValueError(f"layer {self.name}: scale shape {self.scale.shape}, expected ({out}, {ng})")
        if self.zero is not None:
            self.zero = np.asarray(self.zero).astype(np.int8)
            if self.zero.shape != (out, ng):
                raise ValueError(f"layer {self.name}: zero shape {self.zero.shape}, expected ({out}, {ng})")
        lo, hi = -(2 ** (self.w_bits - 1)), 2 ** (self.w_bits - 1) - 1
        if self.w_int.size and (self.w_int.min() < lo or self.w_int.max() > hi):
            raise ValueError(
                f"layer {self.name}: integers span [{self.w_int.min()}, {self.w_int.max()}], "
                f"outside the {self.w_bits}-bit range [{lo}, {hi}]"
            )
        if self.group_size > 0 and self.w_int.ndim == 4:
            raise ValueError(f"layer {self.name}: conv weights are per output channel (group_size 0)")
        if self.input_scale is not None and not (math.isfinite(self.input_scale) and self.input_scale > 0):
            raise ValueError(f"layer {self.name}: input_scale must be finite and > 0, got {self.input_scale}")
        self.w_int = self.w_int.astype(np.int8)

    @property
    def storage_bits(self) -> int:
        """4 for 2..4-bit integers (INT4 initializer), 8 otherwise."""
        return 4 if self.w_bits <= 4 else 8

    @property
    def a_bits(self) -> int:
        return 8 if self.input_scale is not None else FLOAT_BITS

    def dequantize(self) -> np.ndarray:
        """Float32 weight ``(w_int - zero) * scale`` with the original (conv) shape."""
        out = self.w_int.shape[0]
        q = self.w_int.reshape(out, -1).astype(np.float32)
        scale, zero = self.scale, self.zero
        if self.group_size > 0:
            idx = np.arange(q.shape[1]) // self.group_size
            scale = scale[:, idx]
            zero = zero[:, idx] if zero is not None else None
        if zero is not None:
            q = q - zero.astype(np.float32)
        return (q * scale).reshape(self.w_int.shape).astype(np.float32)

    def manifest_entry(
        self, flavour: str, kernel: str | None = None, accuracy_level: int = 4
    ) -> dict[str, Any]:
        """Manifest ``layers`` entry; ``kernel`` is the CPU-flavour kernel (``daptq_ros.export.cpu``).

        ``a_bits``/``act_granularity`` describe what the artifact computes: ``tensor`` = the
        quantizer's static per-tensor scale, ``dynamic_tensor``/``dynamic_block`` = int8
        activations quantized by ORT at run time; ``a_bits_quantizer`` records a static scale
        the quantizer had but the kernel does not use.
        """
        entry: dict[str, Any] = {
            "w_bits": self.w_bits,
            "group_size": self.group_size,
            "a_bits": self.a_bits if flavour == "trt" else FLOAT_BITS,
            "symmetric": self.zero is None,
            "storage": f"int{self.storage_bits}",
        }
        if kernel == "folded":  # computed once at export from the dequantized weights
            entry.update(kernel="folded", a_bits=FLOAT_BITS)
            if self.input_scale is not None:
                entry["a_bits_quantizer"] = 8
        elif flavour == "cpu":
            entry["kernel"] = kernel or "dq"
            granularity = {
                "int8": "tensor",
                "conv_int": "tensor",
                "conv_im2col": "tensor",
                "dynamic": "dynamic_tensor",
            }.get(entry["kernel"])
            if entry["kernel"] == "nbits" and accuracy_level == 4:
                granularity = "dynamic_block"
            if granularity is not None:
                entry["a_bits"] = 8
                entry["act_granularity"] = granularity
            if self.input_scale is not None and granularity != "tensor":
                entry["a_bits_quantizer"] = 8
        if self.channel_bits is not None:
            entry["channel_bits"] = list(self.channel_bits)
        return entry


# --------------------------------------------------------------------------------- node mapping
def node_module_names(node: onnx.NodeProto) -> list[str]:
    """Torch module names a node may belong to, most specific first.

    Dynamo graphs carry ``pkg.torch.onnx.name_scopes`` (e.g. ``['', 'trunk', 'trunk.blocks.0', ...,
    'linear']``); legacy graphs encode scopes in the node name (``/trunk/blocks.0/q_proj/MatMul``).
    """
    names: list[str] = []
    for prop in node.metadata_props:
        if prop.key == "pkg.torch.onnx.name_scopes":
            try:
                scopes = ast.literal_eval(prop.value)
            except (ValueError, SyntaxError):
                scopes = []
            names.extend(reversed([s for s in scopes if s]))
    if node.name.startswith("/"):
        parts = [p for p in node.name.split("/") if p]
        names.extend(reversed(parts[:-1]))
    return names


def _weight_source(
    node: onnx.NodeProto, inits: Mapping[str, Any], producers: Mapping[str, onnx.NodeProto]
) -> tuple[str | None, bool]:
    """(initializer feeding the node's weight input, whether it goes through a 2-D Transpose).

    Dynamo graphs fold ``W^T`` into a new initializer for a Linear called once but keep
    ``Transpose(W)`` when the transposed weight is shared by several calls (flow-head steps).
    """
    if len(node.input) < 2:
        return None, False
    name = node.input[1]
    if name in inits:
        return name, False
    prod = producers.get(name)
    is_transpose = prod is not None and prod.op_type == "Transpose" and prod.input[0] in inits
    if node.op_type == "MatMul" and is_transpose:
        perm = next((list(helper.get_attribute_value(a)) for a in prod.attribute if a.name == "perm"), [1, 0])
        if perm == [1, 0]:
            return prod.input[0], True
    return None, False


def match_layers(
    model: onnx.ModelProto, plan: Mapping[str, LayerQuant], folded: Collection[str] = ()
) -> dict[str, list[onnx.NodeProto]]:
    """Map each planned layer to its MatMul/Gemm/Conv node(s), in graph order.

    A module called several times (the flow head's integration steps) has one node per call,
    all sharing its weight. Matching uses the weight initializer name (``NAME.weight``), then the
    node's module scopes. Layers in ``folded`` (input-independent: constant-folded by the
    exporter, their dequantized weights already inside the folded constants) may be absent.

    Raises:
        ExportError: a planned layer outside ``folded`` has no node in the graph.
    """
    inits = {i.name: i for i in model.graph.initializer}
    producers = {out: n for n in model.graph.node for out in n.output}
    found: dict[str, list[onnx.NodeProto]] = defaultdict(list)
    for node in model.graph.node:
        if node.op_type not in ("MatMul", "Gemm", "Conv"):
            continue
        w_name, _ = _weight_source(node, inits, producers)
        if w_name is None:
            continue  # activation x activation MatMul (attention scores): not a weight layer
        candidates = node_module_names(node)
        if w_name.endswith(".weight"):
            candidates.insert(0, w_name[: -len(".weight")])
        layer = next((c for c in candidates if c in plan), None)
        if layer is not None:
            found[layer].append(node)
    missing = sorted(set(plan) - set(found) - set(folded))
    if missing:
        raise ExportError(
            f"quantized layer(s) {missing} not found in the ONNX graph (no MatMul/Gemm/Conv with that "
            "module scope or weight name)"
        )
    return dict(found)


# ------------------------------------------------------------------------------------ rewriting
class _Rewriter:
    def __init__(self, model: onnx.ModelProto, flavour: str) -> None:
        self.model = model
        self.flavour = flavour
        self.inits = {i.name: i for i in model.graph.initializer}
        self.producers = {out: n for n in model.graph.node for out in n.output}
        self.new_inits: list[onnx.TensorProto] = []
        self.before: dict[int, list[onnx.NodeProto]] = defaultdict(list)  # id(node) -> nodes to insert
        self.after: dict[int, list[onnx.NodeProto]] = defaultdict(list)
        self.act_qdq: dict[tuple[str, float], str] = {}
        self.weight_dq_out: dict[tuple[str, str], str] = {}
        self.counts = {"DequantizeLinear": 0, "QuantizeLinear": 0}
        self.removed: set[int] = set()  # ids of nodes absorbed by a rewritten node (bias Add)

    def _init(self, name: str, array: np.ndarray) -> str:
        self.new_inits.append(numpy_helper.from_array(array, name))
        return name

    def weight_dq(self, node: onnx.NodeProto, lq: LayerQuant, layout: str) -> str:
        """DQ output for ``lq`` in ``layout`` (``kn`` = B[K, N], ``oi`` = (out, in[, kh, kw])).

        Built once per layer and inserted before its first consumer; later calls reuse it.
        """
        if (lq.name, layout) in self.weight_dq_out:
            return self.weight_dq_out[(lq.name, layout)]
        base = f"{lq.name}.weight"
        q = lq.w_int
        scale, zero = lq.scale, lq.zero
        blocked = lq.group_size > 0
        storage = ml_dtypes.int4 if lq.storage_bits == 4 else np.int8
        if layout == "kn":
            q, scale = q.T, scale.T  # (K, N); (n_groups, N)
            zero = zero.T if zero is not None else None
            axis = 0 if blocked else 1  # blocks along K, or one scale per output column
            if not blocked:
                scale, zero = scale[0], (zero[0] if zero is not None else None)
        else:
            axis = 0  # conv: per output channel
            scale, zero = scale[:, 0], (zero[:, 0] if zero is not None else None)
        zp = np.zeros(scale.shape, np.int8) if zero is None else zero
        names = [
            self._init(f"{base}_quantized", np.ascontiguousarray(q).astype(storage)),
            self._init(f"{base}_scale", np.ascontiguousarray(scale, dtype=np.float32)),
            self._init(f"{base}_zero_point", np.ascontiguousarray(zp).astype(storage)),
        ]
        attrs: dict[str, Any] = {"axis": axis}
        if blocked:
            attrs["block_size"] = lq.group_size
        out = f"{base}_dequantized"
        self.before[id(node)].append(
            helper.make_node("DequantizeLinear", names, [out], name=f"{base}_DequantizeLinear", **attrs)
        )
        self.counts["DequantizeLinear"] += 1
        self.weight_dq_out[(lq.name, layout)] = out
        return out

    def act_qdq_for(self, node: onnx.NodeProto, tensor: str, scale: float, layer: str) -> str:
        key = (tensor, float(np.float32(scale)))
        if key in self.act_qdq:
            return self.act_qdq[key]
        tag = f"{layer}.input"
        s = self._init(f"{tag}_scale", np.array(scale, dtype=np.float32))
        z = self._init(f"{tag}_zero_point", np.array(0, dtype=np.int8))
        q_out, dq_out = f"{tag}_quantized", f"{tag}_dequantized"
        self.before[id(node)].extend(
            [
                helper.make_node("QuantizeLinear", [tensor, s, z], [q_out], name=f"{tag}_QuantizeLinear"),
                helper.make_node("DequantizeLinear", [q_out, s, z], [dq_out], name=f"{tag}_DequantizeLinear"),
            ]
        )
        self.counts["QuantizeLinear"] += 1
        self.counts["DequantizeLinear"] += 1
        self.act_qdq[key] = dq_out
        return dq_out

    def rewrite(self, node: onnx.NodeProto, lq: LayerQuant, call: int = 0) -> None:
        w_name, transposed = _weight_source(node, self.inits, self.producers)
        w = numpy_helper.to_array(self.inits[w_name])
        if transposed:
            w = w.T
        out_dim, in_flat = lq.w_int.shape[0], int(np.prod(lq.w_int.shape[1:]))
        if node.op_type == "Conv":
            if w.shape != lq.w_int.shape:
                raise ExportError(f"layer {lq.name}: Conv weight {w.shape} vs quantized {lq.w_int.shape}")
            node.input[1] = self.weight_dq(node, lq, "oi")
        elif node.op_type == "MatMul":
            if w.shape != (in_flat, out_dim):
                raise ExportError(
                    f"layer {lq.name}: MatMul B {w.shape}, expected (in, out) = ({in_flat}, {out_dim})"
                )
            node.input[1] = self.weight_dq(node, lq, "kn")
        else:
            self._gemm_to_matmul(node, lq, w)
        if lq.input_scale is not None and self.flavour == "trt":
            tag = lq.name if call == 0 else f"{lq.name}.call{call}"
            node.input[0] = self.act_qdq_for(node, node.input[0], lq.input_scale, tag)

    def _gemm_to_matmul(self, node: onnx.NodeProto, lq: LayerQuant, w: np.ndarray) -> None:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if attrs.get("transA", 0) or attrs.get("alpha", 1.0) != 1.0 or attrs.get("beta", 1.0) != 1.0:
            raise ExportError(f"layer {lq.name}: Gemm with transA/alpha/beta {attrs} is not a Linear")
        expected = (lq.w_int.shape[0], lq.w_int.shape[1]) if attrs.get("transB", 0) else lq.w_int.shape[::-1]
        if w.shape != tuple(expected):
            raise ExportError(f"layer {lq.name}: Gemm B {w.shape}, expected {tuple(expected)}")
        bias = node.input[2] if len(node.input) > 2 and node.input[2] else None
        out = node.output[0]
        node.op_type = "MatMul"
        del node.attribute[:]
        mm_out = f"{out}_matmul" if bias else out
        node.input[:] = [node.input[0], self.weight_dq(node, lq, "kn")]
        node.output[:] = [mm_out]
        if bias:
            self.after[id(node)].append(
                helper.make_node("Add", [mm_out, bias], [out], name=f"{lq.name}.bias_add")
            )

    def finish(self) -> None:
        graph = self.model.graph
        nodes = []
        for node in graph.node:
            nodes.extend(self.before.get(id(node), []))
            if id(node) not in self.removed:
                nodes.append(node)
            nodes.extend(self.after.get(id(node), []))
        # Drop nodes left without consumers (the Transpose(W) feeding a now-quantized MatMul).
        outputs = {o.name for o in graph.output}
        while True:
            used = {name for n in nodes for name in n.input} | outputs
            alive = [n for n in nodes if any(o in used for o in n.output)]
            if len(alive) == len(nodes):
                break
            nodes = alive
        del graph.node[:]
        graph.node.extend(
            _topological(
                nodes, {i.name for i in graph.input} | set(self.inits) | {t.name for t in self.new_inits}
            )
        )
        used = {name for n in graph.node for name in n.input}
        kept = [i for i in graph.initializer if i.name in used]
        del graph.initializer[:]
        graph.initializer.extend(kept + self.new_inits)


def _topological(nodes: list[onnx.NodeProto], available: set[str]) -> list[onnx.NodeProto]:
    """Stable topological order (a shared activation Q/DQ may be created after its first user)."""
    ready = set(available) | {""}
    pending, ordered = list(nodes), []
    while pending:
        rest = []
        for node in pending:
            if all(name in ready for name in node.input):
                ordered.append(node)
                ready.update(node.output)
            else:
                rest.append(node)
        if len(rest) == len(pending):
            raise ExportError(f"graph has a cycle or a dangling input at node {rest[0].name!r}")
        pending = rest
    return ordered


def rewrite_qdq(
    model: onnx.ModelProto,
    plan: Sequence[LayerQuant],
    flavour: str = "trt",
    cpu_options: Any = None,
    kernels: dict[str, str] | None = None,
    prefixes: dict[str, str] | None = None,
    folded: Collection[str] = (),
) -> dict[str, int]:
    """Rewrite ``model`` in place per ``plan``; returns inserted node counts.

    ``trt``: standard QDQ (TensorRT rules). ``cpu``: ORT-CPU kernels carrying the same integers
    and scales (:mod:`daptq_ros.export.cpu`, options ``cpu_options``); the chosen kernel and the
    short tensor-name prefix per layer are written into ``kernels`` / ``prefixes`` when given.
    Layers of ``folded`` that the graph does not contain are skipped, and their kernel is
    recorded as ``"folded"`` (see :func:`match_layers`).

    Raises:
        ExportError: a layer is missing from the graph or its weight shape disagrees.
    """
    if flavour not in FLAVOURS:
        raise ExportError(f"flavour must be one of {FLAVOURS}, got {flavour!r}")
    by_name = {lq.name: lq for lq in plan}
    if len(by_name) != len(plan):
        raise ExportError("quant plan lists a layer twice")
    _ensure_opset(model)
    matches = match_layers(model, by_name, folded)
    absent = sorted(set(by_name) - set(matches))
    if absent:
        logger.info(
            "layer(s) %s have input-independent inputs and were constant-folded by the exporter from "
            "their dequantized weights: no run-time node", absent
        )
        if kernels is not None:
            kernels.update(dict.fromkeys(absent, "folded"))
        by_name = {name: lq for name, lq in by_name.items() if name in matches}
    if flavour == "cpu":
        from daptq_ros.export.cpu import rewrite_cpu

        counts, chosen, names = rewrite_cpu(model, matches, by_name, cpu_options)
        if kernels is not None:
            kernels.update(chosen)
        if prefixes is not None:
            prefixes.update(names)
        return counts
    rw = _Rewriter(model, flavour)
    for name, nodes in matches.items():
        lq = by_name[name]
        if flavour == "trt" and lq.zero is not None:
            logger.warning("layer %s is asymmetric (zero points): TensorRT requires zp 0", name)
        for call, node in enumerate(nodes):
            rw.rewrite(node, lq, call)
    rw.finish()
    return rw.counts


def compress_constant_grids(model: onnx.ModelProto, min_elements: int = 4096) -> int:
    """Store separable (1, C, H, W) float constants as per-channel vectors, rebuilt at load.

    A CoordConv grid (``vision.coords``: x varies along W only, y along H only) is 128 KiB of
    float32 in the file, 4 % of a 4-bit policy; each channel that is constant along H or along W
    is kept as its one varying row/column and ``Expand``-ed back (ORT and TensorRT fold the
    constant subgraph at load). Lossless. Returns the number of constants rewritten.
    """
    graph = model.graph
    rewritten, new_nodes, keep = 0, [], []
    for init in graph.initializer:
        if init.data_type != onnx.TensorProto.FLOAT or len(init.dims) != 4 or init.dims[0] != 1:
            keep.append(init)
            continue
        value = numpy_helper.to_array(init)
        if value.size < min_elements:
            keep.append(init)
            continue
        _, c, h, w = value.shape
        parts = []
        for ch in range(c):
            plane = value[0, ch]
            if np.array_equal(plane, np.broadcast_to(plane[:1, :], plane.shape)):
                parts.append(("row", plane[0].reshape(1, 1, 1, w)))
            elif np.array_equal(plane, np.broadcast_to(plane[:, :1], plane.shape)):
                parts.append(("col", plane[:, 0].reshape(1, 1, h, 1)))
            else:
                break
        if len(parts) != c:
            keep.append(init)
            continue
        shape = f"{init.name}.grid_shape"
        keep.append(numpy_helper.from_array(np.array([1, 1, h, w], np.int64), shape))
        pieces = []
        for ch, (_, vec) in enumerate(parts):
            src, out = f"{init.name}.grid{ch}", f"{init.name}.grid{ch}_full"
            keep.append(numpy_helper.from_array(np.ascontiguousarray(vec, dtype=np.float32), src))
            new_nodes.append(helper.make_node("Expand", [src, shape], [out], name=out))
            pieces.append(out)
        new_nodes.append(helper.make_node("Concat", pieces, [init.name], name=f"{init.name}.grid", axis=1))
        rewritten += 1
    if rewritten:
        del graph.initializer[:]
        graph.initializer.extend(keep)
        nodes = new_nodes + list(graph.node)
        del graph.node[:]
        graph.node.extend(nodes)
    return rewritten


def _ensure_opset(model: onnx.ModelProto) -> None:
    for op in model.opset_import:
        if op.domain in ("", "ai.onnx"):
            if op.version < QDQ_OPSET:
                raise ExportError(
                    f"QDQ export needs opset >= {QDQ_OPSET} (INT4, blocked DequantizeLinear); "
                    f"the FP graph has {op.version}: re-export with --opset {QDQ_OPSET}"
                )
            return


def weight_bits_summary(model: onnx.ModelProto, plan: Sequence[LayerQuant]) -> float:
    """Parameter-weighted average weight bits over all MatMul/Gemm/Conv weights (float = 16)."""
    inits = {i.name: i for i in model.graph.initializer}
    bits = params = 0.0
    for lq in plan:
        n_in = int(np.prod(lq.w_int.shape[1:]))
        row = np.asarray(lq.channel_bits if lq.channel_bits is not None else [lq.w_bits] * lq.w_int.shape[0])
        bits += float(row.sum()) * n_in
        params += lq.w_int.size
    seen = {f"{lq.name}.weight_quantized" for lq in plan}
    for node in model.graph.node:
        if node.op_type in ("MatMul", "Gemm", "Conv") and len(node.input) > 1:
            name = node.input[1]
            if name in inits and name not in seen:
                seen.add(name)
                size = int(np.prod(inits[name].dims))
                bits += FLOAT_BITS * size
                params += size
    return bits / params if params else float(FLOAT_BITS)


def export_qdq(
    fp_artifact: str | Path,
    plan: Sequence[LayerQuant],
    out_dir: str | Path,
    *,
    flavour: str = "trt",
    method: str = "quantized",
    budget: float | None = None,
    avg_bits: float | None = None,
    extra_config: Mapping[str, Any] | None = None,
    cpu_options: Any = None,
    folded: Collection[str] = (),
) -> Manifest:
    """Write a QDQ artifact from an FP32 artifact directory and a per-layer quant plan.

    Args:
        fp_artifact: directory written by :func:`export_policy` (model.onnx exported from the
            float model or from a float twin with the dequantized weights).
        plan: quantized layers; every other layer stays float.
        out_dir: new artifact directory.
        flavour: ``trt`` (S8S8 QDQ, TensorRT rules) or ``cpu`` (ORT-CPU integer kernels).
        method: quantization method name for the manifest.
        budget: average-bit budget given to the quantizer.
        avg_bits: the quantizer's reported average bits (default: computed over graph weights).
        extra_config: provenance merged into the manifest's ``config`` (e.g. the recipe).
        cpu_options: :class:`daptq_ros.export.cpu.CpuOptions` for the ``cpu`` flavour.
        folded: input-independent layers that the exporter may have constant-folded
            (:func:`daptq_ros.export.quantized.input_independent_layers`).
    """
    import shutil

    fp_artifact, out_dir = Path(fp_artifact), Path(out_dir)
    fp_manifest = read_manifest(fp_artifact)
    model = onnx.load(str(fp_artifact / MODEL_NAME))
    kernels: dict[str, str] = {}
    prefixes: dict[str, str] = {}
    if flavour == "cpu" and cpu_options is None:
        from daptq_ros.export.cpu import CpuOptions

        cpu_options = CpuOptions()
    counts = rewrite_qdq(
        model, plan, flavour=flavour, cpu_options=cpu_options, kernels=kernels, prefixes=prefixes,
        folded=folded,
    )
    set_model_metadata(
        model,
        {
            "daptq.method": method,
            "daptq.flavour": flavour,
            "daptq.layers": json.dumps({lq.name: lq.w_bits for lq in plan}),
        },
    )
    compress_constant_grids(model)
    strip_debug_metadata(model, keep=())  # the deployed graph needs no module scopes
    check_model(model)
    out_dir.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(out_dir / MODEL_NAME))
    if fp_artifact.resolve() != out_dir.resolve():
        shutil.copyfile(fp_artifact / INSTRUCTIONS_NAME, out_dir / INSTRUCTIONS_NAME)
    config = dict(fp_manifest.config)
    config.update(extra_config or {})
    config["qdq"] = counts
    if flavour == "cpu":
        config["cpu_kernels"] = dict(sorted(kernels.items()))
        config["cpu_tensor_prefixes"] = prefixes
        config["cpu_options"] = dataclasses.asdict(cpu_options)
    manifest = Manifest(
        model_sha256=sha256_file(out_dir / MODEL_NAME),
        inputs=fp_manifest.inputs,
        outputs=fp_manifest.outputs,
        normalization=fp_manifest.normalization,
        chunk_size=fp_manifest.chunk_size,
        action_names=fp_manifest.action_names,
        image=fp_manifest.image,
        method=method,
        budget=budget,
        avg_bits=float(avg_bits if avg_bits is not None else weight_bits_summary(model, plan)),
        layers={
            lq.name: lq.manifest_entry(
                flavour, kernels.get(lq.name), getattr(cpu_options, "accuracy_level", 4)
            )
            for lq in plan
        },
        flavour=flavour,
        opset=fp_manifest.opset,
        exporter=fp_manifest.exporter,
        config=json.loads(json.dumps(config, default=str)),
    )
    write_manifest(manifest, out_dir)
    logger.info("wrote %s artifact %s: %d layers quantized, %s", flavour, out_dir, len(plan), counts)
    return manifest
