"""CPU flavour: rewrite quantized layers into ONNX Runtime CPU kernels, keeping the quantizer's numbers.

Why not plain QDQ on ORT-CPU (measured, see ``docs/cpu_latency.md``): a ``DequantizeLinear`` on a
constant weight is never constant-folded, so it runs at every inference; ORT fuses it into an
integer kernel only for unshared single-consumer MatMuls (the flow head calls every head Linear
once per Euler step, so the weight DQ has several consumers and stays a runtime DQ), and its
``MatMulAddFusion`` turns MatMul+Add into Gemm first, which the ``DQ -> MatMulNBits`` fusion skips.
The result ran 2.7-3.5x slower than FP32. This module therefore emits the CPU kernels directly,
per quantized Linear/Conv (each call of a shared layer gets its own kernel node over one shared
initializer):

=============== ==========================================================================
kernel          graph
=============== ==========================================================================
``int8``        ``QuantizeLinear(x, s_x, 128:uint8) -> com.microsoft.MatMulIntegerToFloat(xq,
                W:int8 [K, N], s_x, s_w[N], 128, zp_w, bias)``: static per-tensor int8
                activations with the quantizer's own scale (uint8 + 128 is the same grid as int8
                zp 0) x per-channel int8 weights (U8S8, VNNI where the CPU has it). Per-channel
                layers with ``input_scale``.
``conv_im2col`` convs with ``input_scale`` and >= 16 input channels: ``QuantizeLinear ->
                Transpose(NHWC) -> Pad(zero point) -> Gather`` of the kh*kw pixel rows of every
                output pixel (indices built by constant ops, folded at load) ``->
                MatMulIntegerToFloat(W[(i, j, c), o]) -> Transpose(NCHW)``; ORT cancels the
                transposes between stacked convs.
``conv_int``    other convs with ``input_scale``: ``QuantizeLinear -> ConvInteger(uint8 x,
                uint8 w) -> Cast -> Mul(s_x s_w) -> Add(b)``.
``dynamic``     ``com.microsoft.DynamicQuantizeMatMul(x, W:int8, s_w, zp_w, bias)``: activations
                quantized per tensor at run time. Per-channel weight-only layers (default).
``nbits``       ``com.microsoft.MatMulNBits`` (bits 2, 4 or 8, power-of-two ``block_size``
                dividing the quantizer's group; scales repeated per block, so the math is
                unchanged) with ``accuracy_level`` (4 = int8 compute with per-block dynamic
                activations, 0 = float). Grouped layers.
``float``       ``W = (Cast(q) - zp) * s`` (constant-folded by ORT at load) feeding the original
                op: exact weight-only math at FP32 speed. Weight-only layers on request; convs
                with ``conv="float"``.
``dq``          blocked ``DequantizeLinear -> MatMul`` (fallback for groups without a
                power-of-two block that do not tile K, e.g. 24); slow on ORT-CPU, logged.
=============== ==========================================================================

Storage keeps the quantizer's bit-width: 8-bit as INT8, 4-bit as INT4 + ``Cast``, 2/3-bit as
packed bit planes unpacked by ``BitShift``/``BitwiseAnd``/``BitwiseOr`` -- all constant, so ORT
folds them into one int8 initializer at load and the kernels see int8. Biases of
``MatMul -> Add(bias)`` and ``Gemm`` are folded into the kernel's bias input. Tensor names use a
short per-layer prefix (``q7``; the manifest's ``config.cpu_tensor_prefixes`` maps them back).
"""

from __future__ import annotations

import logging
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import ml_dtypes
import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from daptq_ros.export.onnx_export import ExportError
from daptq_ros.export.qdq import LayerQuant, _Rewriter, _weight_source

logger = logging.getLogger(__name__)

MS_DOMAIN = "com.microsoft"
LINEAR_KERNELS = ("int8", "dynamic", "nbits", "float", "dq")
CONV_KERNELS = ("conv_im2col", "conv_int", "float")
WEIGHT_ONLY_CHOICES = ("dynamic", "float", "nbits")
CONV_CHOICES = ("im2col", "integer", "float")
NBITS_BLOCKS = (256, 128, 64, 32, 16)  # MatMulNBits block sizes (powers of two, >= 16)
UINT8_MID = 128
IM2COL_MIN_CHANNELS = 16  # input channels below which a quantized conv uses ConvInteger


@dataclass(frozen=True)
class CpuOptions:
    """Kernel choices of the CPU flavour.

    Attributes:
        weight_only: kernel of per-channel Linears without an activation scale: ``dynamic``
            (DynamicQuantizeMatMul, fastest), ``float`` (exact weight-only, FP32 speed) or
            ``nbits`` (MatMulNBits).
        accuracy_level: MatMulNBits ``accuracy_level`` (grouped layers): 4 = int8 compute
            (fast; activations quantized per block at run time), 0 = float compute (exact).
        conv: quantized-input convs as ``im2col`` (U8S8 MatMulIntegerToFloat over an NHWC im2col
            of the quantized input), ``integer`` (ConvInteger, U8U8) -- both with the quantizer's
            input scale and the same integer math -- or ``float`` (folded dequantized weights,
            input kept float).
        im2col: ``gather`` (one Gather of pixel rows) or ``slices`` (kh*kw Slices + Concat).
        u8_weights: integer kernels get uint8 weights (``q + 128``, zero point 128): U8U8 GEMMs,
            exact on AVX2 CPUs without VNNI, where U8S8 with 8-bit weights can saturate.
        nbits_block: MatMulNBits block size for per-channel layers routed to ``nbits`` (0 = the
            largest supported power of two not above K).
    """

    weight_only: str = "dynamic"
    accuracy_level: int = 4
    conv: str = "im2col"
    nbits_block: int = 0
    im2col: str = "gather"
    u8_weights: bool = False

    def __post_init__(self) -> None:
        if self.weight_only not in WEIGHT_ONLY_CHOICES:
            raise ExportError(f"weight_only must be one of {WEIGHT_ONLY_CHOICES}, got {self.weight_only!r}")
        if self.accuracy_level not in (0, 1, 2, 3, 4):
            raise ExportError(f"accuracy_level must be 0..4, got {self.accuracy_level}")
        if self.conv not in CONV_CHOICES:
            raise ExportError(f"conv must be one of {CONV_CHOICES}, got {self.conv!r}")
        if self.im2col not in ("gather", "slices"):
            raise ExportError(f"im2col must be 'gather' or 'slices', got {self.im2col!r}")
        if self.nbits_block and self.nbits_block not in NBITS_BLOCKS:
            raise ExportError(f"nbits_block must be 0 or one of {NBITS_BLOCKS}, got {self.nbits_block}")


def nbits_block_size(lq: LayerQuant, k: int, override: int = 0) -> int | None:
    """MatMulNBits block size carrying ``lq``'s scales exactly, or None when none exists.

    Blocks must not straddle two quantizer groups: the block size must divide the group size
    (per-channel layers: any block works, the one scale is repeated).
    """
    group = lq.group_size if 0 < lq.group_size < k else 0
    if group == 0:
        if override:
            return override
        return next((b for b in NBITS_BLOCKS if b <= max(k, 16)), 16)
    return next((b for b in NBITS_BLOCKS if b <= group and group % b == 0), None)


def pack_nbits(lq: LayerQuant, bits: int, block: int) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """MatMulNBits tensors: B uint8 (N, n_blocks, block*bits/8), scales (N*n_blocks,), zero points.

    Integers are stored unsigned (q + 2^(bits-1)), the kernel's default zero point; 2- and 4-bit
    values are packed 4 / 2 per byte, the lower-index element in the lowest bits.
    """
    q = lq.w_int.reshape(lq.w_int.shape[0], -1).astype(np.int32)
    n, k = q.shape
    n_blocks = -(-k // block)
    group = lq.group_size if 0 < lq.group_size < k else n_blocks * block
    mid = 1 << (bits - 1)
    u = np.full((n, n_blocks * block), mid, np.int32)
    u[:, :k] = q + mid
    gidx = (np.arange(n_blocks) * block) // group
    scales = np.ascontiguousarray(lq.scale[:, gidx], dtype=np.float32).reshape(-1)
    u8 = u.reshape(n, n_blocks, block).astype(np.uint8)
    packed = _pack_last_axis(u8, bits)
    zero = None
    if lq.zero is not None:
        z = (lq.zero[:, gidx].astype(np.int32) + mid).astype(np.uint8)
        per = 8 // bits
        pad = (-n_blocks) % per
        if pad:
            z = np.concatenate([z, np.full((n, pad), mid, np.uint8)], axis=1)
        zero = np.ascontiguousarray(_pack_last_axis(z, bits))
    return np.ascontiguousarray(packed), scales, zero


def nbits_for(w_bits: int) -> int:
    """MatMulNBits ``bits`` storing ``w_bits``-bit integers (2, 4 or 8)."""
    return 2 if w_bits <= 2 else 4 if w_bits <= 4 else 8


def _pack_last_axis(u: np.ndarray, bits: int) -> np.ndarray:
    """Pack unsigned ``bits``-bit values along the last axis, lower index in the lower bits."""
    per = 8 // bits
    out = np.zeros((*u.shape[:-1], u.shape[-1] // per), np.uint8)
    for j in range(per):
        out |= (u[..., j::per].astype(np.uint8) << (bits * j)).astype(np.uint8)
    return out


def plane_widths(bits: int) -> list[int]:
    """Bit-plane widths (from the low bits) storing ``bits``-bit integers: 3 -> [2, 1], 2 -> [2]."""
    widths, left = [], bits
    for w in (4, 2, 1):
        while left >= w:
            widths.append(w)
            left -= w
    return widths


def pack_planes(q: np.ndarray, bits: int) -> list[np.ndarray]:
    """Unsigned ``u = q + 2^(bits-1)`` split into bit planes, each packed ``8 / w`` values per byte.

    Plane i holds bits [sum(widths[:i]), +widths[i]) of u; value j of byte b sits at bit w*j.
    Returns uint8 arrays of shape (bytes, 1).
    """
    u = (q.astype(np.int32).reshape(-1) + (1 << (bits - 1))).astype(np.uint32)
    planes, offset = [], 0
    for w in plane_widths(bits):
        per = 8 // w
        vals = (u >> offset) & ((1 << w) - 1)
        pad = (-len(vals)) % per
        vals = np.concatenate([vals, np.zeros(pad, vals.dtype)]).reshape(-1, per)
        packed = np.zeros(len(vals), np.uint32)
        for j in range(per):
            packed |= vals[:, j] << (w * j)
        planes.append(packed.astype(np.uint8).reshape(-1, 1))
        offset += w
    return planes


def _static_shapes(model: onnx.ModelProto) -> dict[str, tuple[int, ...]]:
    """Static tensor shapes from ONNX shape inference (4-D conv inputs need H and W)."""
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception as err:  # inference failures only disable the im2col conv path
        logger.warning("shape inference failed (%s); convs fall back to ConvInteger", err)
        return {}
    shapes = {}
    for value in list(inferred.graph.value_info) + list(inferred.graph.input):
        dims = value.type.tensor_type.shape.dim
        if dims and all(d.HasField("dim_value") for d in dims):
            shapes[value.name] = tuple(int(d.dim_value) for d in dims)
    return shapes


def _attrs(node: onnx.NodeProto) -> dict[str, Any]:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


class _CpuRewriter(_Rewriter):
    """Rewrites matched MatMul/Gemm/Conv nodes in place into CPU kernels (see module docs)."""

    def __init__(self, model: onnx.ModelProto, options: CpuOptions) -> None:
        super().__init__(model, "cpu")
        self.options = options
        self.consumers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
        for node in model.graph.node:
            for name in node.input:
                self.consumers[name].append(node)
        self.outputs = {o.name for o in model.graph.output}
        self.kernels: dict[str, str] = {}
        self.cached: dict[tuple[str, str], Any] = {}
        self.quant_inputs: dict[tuple[str, float], tuple[str, str, str]] = {}
        self.ops: Counter[str] = Counter()
        self.prefixes: dict[str, str] = {}
        self.shapes = _static_shapes(model) if options.conv == "im2col" else {}
        self.counts = Counter(self.counts)

    def prefix(self, lq: LayerQuant) -> str:
        """Short tensor-name prefix of a layer (``q7``): long module names repeated in every node
        input cost ~0.1 MB (4 % of a 4-bit file); the manifest maps prefixes back to layers."""
        return self.prefixes.setdefault(lq.name, f"q{len(self.prefixes)}")

    # ------------------------------------------------------------------ shared constants
    def _const(self, key: tuple[str, str], build: Any) -> Any:
        if key not in self.cached:
            self.cached[key] = build()
        return self.cached[key]

    def _cast_node(self, node: onnx.NodeProto, src: str, dst: str, to: int) -> str:
        """``dst = Cast(src)`` on constants (folded by ORT), inserted before ``node`` once."""
        self.before[id(node)].append(helper.make_node("Cast", [src], [dst], name=dst, to=to))
        return dst

    def _node(self, node: onnx.NodeProto, op: str, inputs: list[str], output: str, **attrs: Any) -> str:
        self.before[id(node)].append(helper.make_node(op, inputs, [output], name=output, **attrs))
        return output

    def _shared_const(self, name: str, value: np.ndarray) -> str:
        return self._const(("", name), lambda: self._init(name, value))

    def stored_int8(self, node: onnx.NodeProto, lq: LayerQuant, q: np.ndarray, tag: str) -> str:
        """int8 tensor equal to ``q`` (any shape), stored in ``lq.w_bits`` bits per value.

        8 bits: an INT8 initializer; 4 bits: INT4 + Cast; 1-3 (5-7) bits: bit planes unpacked by
        BitShift/BitwiseAnd/BitwiseOr. All of it is constant, so ORT folds it to one int8
        initializer at load: the file holds the quantizer's bit-width, the kernels see int8.
        """
        base = f"{self.prefix(lq)}.w{tag}"
        bits = lq.w_bits
        if bits >= 8:
            return self._init(f"{base}.i8", np.ascontiguousarray(q).astype(np.int8))
        if bits == 4:
            self._init(f"{base}.i4", np.ascontiguousarray(q).astype(ml_dtypes.int4))
            return self._cast_node(node, f"{base}.i4", f"{base}.i8", TensorProto.INT8)
        u = ""
        offset = 0
        for i, (w, packed) in enumerate(zip(plane_widths(bits), pack_planes(q, bits), strict=True)):
            per = 8 // w
            shifts = self._shared_const(
                f"daptq_unpack_shifts_w{w}", (np.arange(per) * w).astype(np.uint8)[None]
            )
            mask = self._shared_const(f"daptq_unpack_mask_w{w}", np.array((1 << w) - 1, np.uint8))
            plane = self._init(f"{base}.p{i}", packed)
            vals = self._node(node, "BitShift", [plane, shifts], f"{base}.p{i}s", direction="RIGHT")
            vals = self._node(node, "BitwiseAnd", [vals, mask], f"{base}.p{i}v")
            if offset:
                up = self._shared_const(f"daptq_unpack_offset_{offset}", np.array(offset, np.uint8))
                vals = self._node(node, "BitShift", [vals, up], f"{base}.p{i}l", direction="LEFT")
            flat_shape = self._shared_const("daptq_unpack_flat", np.array([-1], np.int64))
            vals = self._node(node, "Reshape", [vals, flat_shape], f"{base}.p{i}f")
            u = vals if not u else self._node(node, "BitwiseOr", [u, vals], f"{base}.o{i}")
            offset += w
        count = int(q.size)
        start = self._shared_const("daptq_unpack_zero", np.array([0], np.int64))
        stop = self._init(f"{base}.n", np.array([count], np.int64))
        u = self._node(node, "Slice", [u, start, stop], f"{base}.u")
        wide = self._node(node, "Cast", [u], f"{base}.i32", to=TensorProto.INT32)
        mid = self._shared_const(f"daptq_unpack_mid_{bits}", np.array(1 << (bits - 1), np.int32))
        signed = self._node(node, "Sub", [wide, mid], f"{base}.sg")
        shape = self._init(f"{base}.shp", np.array(q.shape, np.int64))
        flat8 = self._node(node, "Cast", [signed], f"{base}.i8f", to=TensorProto.INT8)
        return self._node(node, "Reshape", [flat8, shape], f"{base}.i8")

    def as_uint8(
        self, node: onnx.NodeProto, lq: LayerQuant, q8: str, base: str, zero: np.ndarray | None
    ) -> tuple[str, str]:
        """(uint8 ``q + 128``, uint8 zero point [N]) from an int8 tensor, folded at load.

        U8U8 GEMMs are exact on every x86 CPU; U8S8 can saturate 16-bit intermediates on AVX2
        without VNNI when weights use the full int8 range (see docs/cpu_latency.md).
        """
        wide = self._node(node, "Cast", [q8], f"{base}.u32", to=TensorProto.INT32)
        mid = self._shared_const("daptq_unpack_mid_u8", np.array(UINT8_MID, np.int32))
        shifted = self._node(node, "Add", [wide, mid], f"{base}.ush")
        u8 = self._node(node, "Cast", [shifted], f"{base}.u8", to=TensorProto.UINT8)
        n = lq.w_int.shape[0]
        zp = np.full(n, UINT8_MID, np.int32) + (zero.astype(np.int32) if zero is not None else 0)
        return u8, self._init(f"{base}.uz", zp.astype(np.uint8))

    def int8_weight_kn(self, node: onnx.NodeProto, lq: LayerQuant) -> tuple[str, str, str]:
        """(int8 B[K, N], float scale [N], int8 zero point [N] or "") for the integer kernels."""

        def build() -> tuple[str, str, str]:
            base = f"{self.prefix(lq)}.w"
            q = np.ascontiguousarray(lq.w_int.reshape(lq.w_int.shape[0], -1).T)
            w = self.stored_int8(node, lq, q, "kn")
            scale = self._init(f"{base}.s", np.ascontiguousarray(lq.scale[:, 0], dtype=np.float32))
            zero = ""
            if lq.zero is not None:
                zero = self._init(f"{base}.z", np.ascontiguousarray(lq.zero[:, 0]).astype(np.int8))
            if self.options.u8_weights:
                w, zero = self.as_uint8(node, lq, w, base, lq.zero[:, 0] if lq.zero is not None else None)
            return w, scale, zero

        return self._const((lq.name, "int8_kn"), build)

    def float_weight(self, node: onnx.NodeProto, lq: LayerQuant, layout: str) -> str:
        """Float weight ``(Cast(q) - zp) * s`` in ``layout`` (``kn``, ``nk`` or ``oi``), folded at load."""

        def build() -> str:
            base = f"{self.prefix(lq)}.w"
            out = lq.w_int.shape[0]
            q = lq.w_int.reshape(out, -1)
            k = q.shape[1]
            group = lq.group_size if 0 < lq.group_size < k else k
            n_groups = k // group
            if group * n_groups != k:
                raise ExportError(f"layer {lq.name}: ragged groups have no folded float form")
            q_name = self.stored_int8(node, lq, q.reshape(out, n_groups, group), "g")
            qf = self._cast_node(node, q_name, f"{base}.qf", TensorProto.FLOAT)
            if lq.zero is not None:
                zp = self._init(f"{base}.z", lq.zero.astype(np.float32).reshape(out, n_groups, 1))
                sub = f"{base}.c"
                self.before[id(node)].append(helper.make_node("Sub", [qf, zp], [sub], name=sub))
                qf = sub
            scale = self._init(f"{base}.s", lq.scale.astype(np.float32).reshape(out, n_groups, 1))
            wf = f"{base}.f"
            self.before[id(node)].append(helper.make_node("Mul", [qf, scale], [wf], name=wf))
            shape = self._init(f"{base}.shp", np.array(lq.w_int.shape, np.int64))
            self.before[id(node)].append(
                helper.make_node("Reshape", [wf, shape], [f"{wf}oi"], name=f"{wf}oi")
            )
            return f"{wf}oi"

        oi = self._const((lq.name, "float_oi"), build)
        if layout in ("oi", "nk"):
            return oi

        def transpose() -> str:
            out = f"{self.prefix(lq)}.w.fkn"
            self.before[id(node)].append(helper.make_node("Transpose", [oi], [out], name=out, perm=[1, 0]))
            return out

        return self._const((lq.name, "float_kn"), transpose)

    def quant_input(self, node: onnx.NodeProto, tensor: str, scale: float, tag: str) -> tuple[str, str, str]:
        """(uint8 tensor, scale, zero point) of ``QuantizeLinear(tensor, scale, 128)``, shared per key."""
        key = (tensor, float(np.float32(scale)))
        if key not in self.quant_inputs:
            s = self._init(f"{tag}.xs", np.array(scale, dtype=np.float32))
            z = self._init(f"{tag}.xz", np.array(UINT8_MID, dtype=np.uint8))
            out = f"{tag}.xq"
            self.before[id(node)].append(helper.make_node("QuantizeLinear", [tensor, s, z], [out], name=out))
            self.counts["QuantizeLinear"] += 1
            self.quant_inputs[key] = (out, s, z)
        return self.quant_inputs[key]

    # ------------------------------------------------------------------ kernel choice
    def choose(self, node: onnx.NodeProto, lq: LayerQuant, k: int) -> str:
        if node.op_type == "Conv":
            symmetric_or_scalar = lq.zero is None
            if lq.input_scale is None or self.options.conv == "float":
                return "float"
            attrs = _attrs(node)
            plain = attrs.get("group", 1) == 1 and set(attrs.get("dilations", [1])) == {1}
            plain = plain and attrs.get("auto_pad", b"NOTSET") in (b"NOTSET", "NOTSET")
            # im2col copies C-byte pixel rows: with few input channels (an RGB stem) the copies are
            # too small to pay off and ConvInteger is faster (measured, docs/cpu_latency.md)
            wide = lq.w_int.shape[1] >= IM2COL_MIN_CHANNELS
            if self.options.conv == "im2col" and plain and wide and node.input[0] in self.shapes:
                return "conv_im2col"
            return "conv_int" if symmetric_or_scalar else "float"
        grouped = 0 < lq.group_size < k
        if grouped:
            if nbits_block_size(lq, k) is not None and self._zero_fits(lq):
                return "nbits"
            return "float" if k % lq.group_size == 0 else "dq"  # folded float is exact when groups tile K
        if lq.input_scale is not None:
            return "int8"
        if self.options.weight_only == "nbits" and self._zero_fits(lq):
            return "nbits"
        return self.options.weight_only if self.options.weight_only != "nbits" else "dynamic"

    @staticmethod
    def _zero_fits(lq: LayerQuant) -> bool:
        if lq.zero is None:
            return True
        mid = 1 << (nbits_for(lq.w_bits) - 1)
        return bool(
            ((lq.zero.astype(np.int32) + mid >= 0) & (lq.zero.astype(np.int32) + mid < 2 * mid)).all()
        )

    # ------------------------------------------------------------------ rewriting
    def _linear_bias(self, node: onnx.NodeProto, n_out: int) -> tuple[str, str]:
        """(bias initializer or "", output name) with ``MatMul -> Add(bias[N])`` folded (Add removed)."""
        if node.op_type == "Gemm":
            bias = node.input[2] if len(node.input) > 2 else ""
            if bias and not (bias in self.inits and tuple(self.inits[bias].dims) == (n_out,)):
                raise ExportError(f"Gemm {node.name}: bias must be a constant of shape ({n_out},)")
            return bias, node.output[0]
        out = node.output[0]
        users = self.consumers.get(out, [])
        if out in self.outputs or len(users) != 1 or users[0].op_type != "Add":
            return "", out
        add = users[0]
        other = add.input[1] if add.input[0] == out else add.input[0]
        init = self.inits.get(other)
        if init is None or tuple(init.dims) != (n_out,) or init.data_type != TensorProto.FLOAT:
            return "", out
        self.removed.add(id(add))
        return other, add.output[0]

    def rewrite(self, node: onnx.NodeProto, lq: LayerQuant, call: int = 0) -> None:
        w_name, transposed = _weight_source(node, self.inits, self.producers)
        w_shape = tuple(self.inits[w_name].dims)
        if transposed:
            w_shape = w_shape[::-1]
        n_out, k = lq.w_int.shape[0], int(np.prod(lq.w_int.shape[1:]))
        if node.op_type == "Conv":
            if w_shape != lq.w_int.shape:
                raise ExportError(f"layer {lq.name}: Conv weight {w_shape} vs quantized {lq.w_int.shape}")
        elif node.op_type == "MatMul":
            if w_shape != (k, n_out):
                raise ExportError(f"layer {lq.name}: MatMul B {w_shape}, expected (in, out) = ({k}, {n_out})")
        else:
            attrs = _attrs(node)
            if attrs.get("transA", 0) or attrs.get("alpha", 1.0) != 1.0 or attrs.get("beta", 1.0) != 1.0:
                raise ExportError(f"layer {lq.name}: Gemm with transA/alpha/beta {attrs} is not a Linear")
            expected = (n_out, k) if attrs.get("transB", 0) else (k, n_out)
            if w_shape != expected:
                raise ExportError(f"layer {lq.name}: Gemm B {w_shape}, expected {expected}")
        kernel = self.choose(node, lq, k)
        previous = self.kernels.setdefault(lq.name, kernel)
        if previous != kernel:  # pragma: no cover - choice depends only on the layer
            raise ExportError(f"layer {lq.name}: inconsistent kernels {previous} / {kernel}")
        tag = self.prefix(lq) if call == 0 else f"{self.prefix(lq)}.c{call}"
        if kernel == "conv_int":
            self._conv_integer(node, lq, tag)
        elif kernel == "conv_im2col":
            self._conv_im2col(node, lq, tag)
        elif kernel == "float":
            self._float(node, lq)
        elif kernel == "dq":
            logger.warning(
                "layer %s: group size %d has no MatMulNBits block (power of two >= 16 dividing it) "
                "and does not tile K=%d: runtime DequantizeLinear (slow on ORT-CPU)",
                lq.name,
                lq.group_size,
                k,
            )
            super().rewrite(node, lq, call)
        else:
            self._linear(node, lq, kernel, k, n_out, tag)
        self.ops[kernel] += 1

    def _linear(
        self, node: onnx.NodeProto, lq: LayerQuant, kernel: str, k: int, n_out: int, tag: str
    ) -> None:
        bias, out = self._linear_bias(node, n_out)
        x = node.input[0]
        del node.attribute[:]
        node.domain = MS_DOMAIN
        node.output[:] = [out]
        if kernel == "int8":
            w, w_scale, w_zero = self.int8_weight_kn(node, lq)
            xq, x_scale, x_zero = self.quant_input(node, x, float(lq.input_scale), tag)  # type: ignore[arg-type]
            node.op_type = "MatMulIntegerToFloat"
            node.input[:] = [xq, w, x_scale, w_scale, x_zero, w_zero, bias]
        elif kernel == "dynamic":
            w, w_scale, w_zero = self.int8_weight_kn(node, lq)
            node.op_type = "DynamicQuantizeMatMul"
            node.input[:] = [x, w, w_scale, w_zero, bias]
        else:  # nbits
            bits = nbits_for(lq.w_bits)
            block = nbits_block_size(lq, k, self.options.nbits_block)
            assert block is not None

            def build() -> tuple[str, str, str]:
                packed, scales, zero = pack_nbits(lq, bits, block)
                base = f"{self.prefix(lq)}.w"
                names = (
                    self._init(f"{base}.nb", packed),
                    self._init(f"{base}.nbs", scales),
                    self._init(f"{base}.nbz", zero) if zero is not None else "",
                )
                return names

            b, scales, zero = self._const((lq.name, "nbits"), build)
            node.op_type = "MatMulNBits"
            node.input[:] = [x, b, scales, zero, "", bias]
            node.attribute.extend(
                [
                    helper.make_attribute("K", k),
                    helper.make_attribute("N", n_out),
                    helper.make_attribute("bits", bits),
                    helper.make_attribute("block_size", block),
                    helper.make_attribute("accuracy_level", self.options.accuracy_level),
                ]
            )
        while node.input and node.input[-1] == "":
            node.input.pop()
        self.counts[node.op_type] += 1

    def _float(self, node: onnx.NodeProto, lq: LayerQuant) -> None:
        if node.op_type == "Conv":
            node.input[1] = self.float_weight(node, lq, "oi")
        elif node.op_type == "MatMul":
            node.input[1] = self.float_weight(node, lq, "kn")
        else:
            trans_b = _attrs(node).get("transB", 0)
            node.input[1] = self.float_weight(node, lq, "nk" if trans_b else "kn")

    def _conv_im2col(self, node: onnx.NodeProto, lq: LayerQuant, tag: str) -> None:
        """Conv as int8 GEMM over an NHWC im2col of the quantized input.

        ``QuantizeLinear -> Transpose(NHWC) -> Pad(zero point) -> kh*kw strided Slices -> Concat
        -> MatMulIntegerToFloat(W[(i, j, c), o]) -> Transpose(NCHW)``: the patches are gathered on
        uint8 data and the GEMM runs on the U8S8 (VNNI) kernel, unlike ``ConvInteger`` (U8U8).
        ORT's transpose optimizer cancels the NCHW<->NHWC pairs between stacked convs.
        """
        attrs = _attrs(node)
        o, c, kh, kw = lq.w_int.shape
        sh, sw = list(attrs.get("strides", [1, 1]))
        pt, pl, pb, pr = list(attrs.get("pads", [0, 0, 0, 0]))
        _, _, h, w = self.shapes[node.input[0]]
        ho, wo = (h + pt + pb - kh) // sh + 1, (w + pl + pr - kw) // sw + 1
        k = kh * kw * c
        bias = node.input[2] if len(node.input) > 2 and node.input[2] else ""
        out = node.output[0]
        p = self.prefix(lq)

        def weights() -> tuple[str, str]:
            wk = np.ascontiguousarray(lq.w_int.transpose(2, 3, 1, 0).reshape(k, o))
            q8 = self.stored_int8(node, lq, wk, "k")
            scale = self._init(f"{p}.w.s", np.ascontiguousarray(lq.scale[:, 0], dtype=np.float32))
            zero = ""
            if self.options.u8_weights:
                q8, zero = self.as_uint8(node, lq, q8, f"{p}.w", None)
            return q8, scale, zero

        w8, w_scale, w_zero = self._const((lq.name, "im2col"), weights)
        xq, x_scale, x_zero = self.quant_input(node, node.input[0], float(lq.input_scale), tag)  # type: ignore[arg-type]
        nodes = [helper.make_node("Transpose", [xq], [f"{tag}.nhwc"], name=f"{tag}.nhwc", perm=[0, 2, 3, 1])]
        src = f"{tag}.nhwc"
        if any((pt, pl, pb, pr)):
            pads = self._init(f"{tag}.pads", np.array([0, pt, pl, 0, 0, pb, pr, 0], np.int64))
            nodes.append(helper.make_node("Pad", [src, pads, x_zero], [f"{tag}.pad"], name=f"{tag}.pad"))
            src = f"{tag}.pad"
        if self.options.im2col == "gather":
            nodes += self._im2col_gather(
                tag, src, c, (h + pt + pb, w + pl + pr), (kh, kw), (sh, sw), (ho, wo)
            )
        else:
            nodes += self._im2col_slices(tag, src, (kh, kw), (sh, sw), (ho, wo))
        flat = self._init(f"{tag}.colshape", np.array([1, ho * wo, k], np.int64))
        nodes.append(helper.make_node("Reshape", [f"{tag}.col", flat], [f"{tag}.cols"], name=f"{tag}.cols"))
        self.before[id(node)].extend(nodes)
        node.op_type = "MatMulIntegerToFloat"
        node.domain = MS_DOMAIN
        del node.attribute[:]
        bias_name = self._const((lq.name, "im2col_bias"), lambda: bias) if bias else ""
        node.input[:] = [f"{tag}.cols", w8, x_scale, w_scale, x_zero, w_zero, bias_name]
        node.output[:] = [f"{tag}.y"]
        shape4 = self._init(f"{tag}.yshape", np.array([1, ho, wo, o], np.int64))
        self.after[id(node)].extend(
            [
                helper.make_node("Reshape", [f"{tag}.y", shape4], [f"{tag}.y4"], name=f"{tag}.y4"),
                helper.make_node("Transpose", [f"{tag}.y4"], [out], name=f"{tag}.nchw", perm=[0, 3, 1, 2]),
            ]
        )
        self.counts["MatMulIntegerToFloat"] += 1

    def _im2col_slices(
        self, tag: str, src: str, kernel: tuple[int, int], stride: tuple[int, int], out_hw: tuple[int, int]
    ) -> list[onnx.NodeProto]:
        """kh*kw strided Slices of the padded NHWC input, concatenated on channels -> (1,Ho,Wo,K)."""
        (kh, kw), (sh, sw), (ho, wo) = kernel, stride, out_hw
        axes = self._shared_const("daptq_im2col_axes", np.array([1, 2], np.int64))
        steps = self._init(f"{tag}.steps", np.array([sh, sw], np.int64))
        nodes, cols = [], []
        for i in range(kh):
            for j in range(kw):
                starts = self._init(f"{tag}.st{i}{j}", np.array([i, j], np.int64))
                ends = self._init(
                    f"{tag}.en{i}{j}", np.array([i + sh * (ho - 1) + 1, j + sw * (wo - 1) + 1], np.int64)
                )
                cols.append(f"{tag}.col{i}{j}")
                nodes.append(
                    helper.make_node("Slice", [src, starts, ends, axes, steps], [cols[-1]], name=cols[-1])
                )
        nodes.append(helper.make_node("Concat", cols, [f"{tag}.col"], name=f"{tag}.col", axis=3))
        return nodes

    def _im2col_gather(
        self,
        tag: str,
        src: str,
        channels: int,
        padded_hw: tuple[int, int],
        kernel: tuple[int, int],
        stride: tuple[int, int],
        out_hw: tuple[int, int],
    ) -> list[onnx.NodeProto]:
        """One Gather of C-byte pixel rows of the padded NHWC input -> (HoWo*kh*kw, C).

        The row indices ``(oy*sh + i)*Wp + ox*sw + j`` are built from Range/Mul/Add on constants,
        so ORT folds them at load and the file does not carry them.
        """
        (hp, wp), (kh, kw), (sh, sw), (ho, wo) = padded_hw, kernel, stride, out_hw

        def const(name: str, value: Any) -> str:
            return self._init(f"{tag}.g{name}", np.array(value, np.int64))

        zero, one = (
            self._shared_const("daptq_i64_0", np.array(0, np.int64)),
            self._shared_const("daptq_i64_1", np.array(1, np.int64)),
        )
        nodes = [
            helper.make_node("Range", [zero, const("ho", ho), one], [f"{tag}.ry"], name=f"{tag}.ry"),
            helper.make_node("Range", [zero, const("wo", wo), one], [f"{tag}.rx"], name=f"{tag}.rx"),
            helper.make_node("Mul", [f"{tag}.ry", const("syw", sh * wp)], [f"{tag}.ryw"], name=f"{tag}.ryw"),
            helper.make_node("Mul", [f"{tag}.rx", const("sx", sw)], [f"{tag}.rxs"], name=f"{tag}.rxs"),
            helper.make_node(
                "Reshape", [f"{tag}.ryw", const("ys", [ho, 1, 1])], [f"{tag}.ry3"], name=f"{tag}.ry3"
            ),
            helper.make_node(
                "Reshape", [f"{tag}.rxs", const("xs", [1, wo, 1])], [f"{tag}.rx3"], name=f"{tag}.rx3"
            ),
            helper.make_node("Add", [f"{tag}.ry3", f"{tag}.rx3"], [f"{tag}.base"], name=f"{tag}.base"),
        ]
        taps = const("taps", [[[i * wp + j for i in range(kh) for j in range(kw)]]])
        nodes += [
            helper.make_node("Add", [f"{tag}.base", taps], [f"{tag}.idx3"], name=f"{tag}.idx3"),
            helper.make_node(
                "Reshape", [f"{tag}.idx3", const("flat", [-1])], [f"{tag}.idx"], name=f"{tag}.idx"
            ),
            helper.make_node(
                "Reshape", [src, const("rows", [hp * wp, channels])], [f"{tag}.rows"], name=f"{tag}.rows"
            ),
            helper.make_node(
                "Gather", [f"{tag}.rows", f"{tag}.idx"], [f"{tag}.col"], name=f"{tag}.col", axis=0
            ),
        ]
        return nodes

    def _conv_integer(self, node: onnx.NodeProto, lq: LayerQuant, tag: str) -> None:
        attrs = {
            k: v
            for k, v in _attrs(node).items()
            if k in ("dilations", "group", "kernel_shape", "pads", "strides", "auto_pad")
        }
        bias = node.input[2] if len(node.input) > 2 and node.input[2] else ""
        out = node.output[0]
        n_out = lq.w_int.shape[0]

        def build() -> tuple[str, str]:
            base = f"{self.prefix(lq)}.w"
            if lq.w_bits >= 8:
                w = self._init(f"{base}.u8", (lq.w_int.astype(np.int16) + UINT8_MID).astype(np.uint8))
            else:  # ConvInteger takes uint8 weights: q + 128, folded at load from the packed storage
                q8 = self.stored_int8(node, lq, lq.w_int, "c")
                wide = self._node(node, "Cast", [q8], f"{base}.i32", to=TensorProto.INT32)
                mid = self._shared_const("daptq_unpack_mid_u8", np.array(UINT8_MID, np.int32))
                shifted = self._node(node, "Add", [wide, mid], f"{base}.sh")
                w = self._node(node, "Cast", [shifted], f"{base}.u8", to=TensorProto.UINT8)
            zp = self._init(f"{base}.z", np.array(UINT8_MID, np.uint8))
            return w, zp

        w, w_zero = self._const((lq.name, "conv_u8"), build)
        xq, _, x_zero = self.quant_input(node, node.input[0], float(lq.input_scale), tag)  # type: ignore[arg-type]
        combined = (np.float32(lq.input_scale) * lq.scale[:, 0].astype(np.float32)).reshape(1, n_out, 1, 1)
        out_scale = self._init(f"{tag}.ys", combined.astype(np.float32))
        node.op_type = "ConvInteger"
        node.input[:] = [xq, w, x_zero, w_zero]
        del node.attribute[:]
        node.attribute.extend(helper.make_attribute(k, v) for k, v in attrs.items())
        node.output[:] = [f"{tag}.y32"]
        after = [
            helper.make_node("Cast", [f"{tag}.y32"], [f"{tag}.yf"], name=f"{tag}.yf", to=TensorProto.FLOAT),
        ]
        scaled = out if not bias else f"{tag}.ym"
        after.append(helper.make_node("Mul", [f"{tag}.yf", out_scale], [scaled], name=f"{tag}.ym"))
        if bias:
            b4 = self._const(
                (lq.name, "conv_bias"),
                lambda: self._reshaped_bias(bias, n_out),
            )
            after.append(helper.make_node("Add", [scaled, b4], [out], name=f"{tag}.yb"))
        self.after[id(node)].extend(after)
        self.counts["ConvInteger"] += 1

    def _reshaped_bias(self, bias: str, n_out: int) -> str:
        value = numpy_helper.to_array(self.inits[bias]).astype(np.float32).reshape(1, n_out, 1, 1)
        return self._init(f"{bias}_nchw", value)


def rewrite_cpu(
    model: onnx.ModelProto,
    matches: dict[str, list[onnx.NodeProto]],
    plan: dict[str, LayerQuant],
    options: CpuOptions | None = None,
) -> tuple[dict[str, int], dict[str, str], dict[str, str]]:
    """Rewrite matched nodes in place; returns (inserted op counts, kernel per layer, tensor-name
    prefix per layer)."""
    rw = _CpuRewriter(model, options or CpuOptions())
    for name, nodes in matches.items():
        for call, node in enumerate(nodes):
            rw.rewrite(node, plan[name], call)
    rw.finish()
    if any(n.domain == MS_DOMAIN for n in model.graph.node) and not any(
        o.domain == MS_DOMAIN for o in model.opset_import
    ):
        model.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
    counts = {k: v for k, v in rw.counts.items() if v}
    return counts, dict(rw.kernels), dict(rw.prefixes)


def kernel_summary(kernels: dict[str, str]) -> dict[str, int]:
    """Number of layers per kernel (for logs and the manifest)."""
    return dict(Counter(kernels.values()))


__all__: Sequence[str] = (
    "CONV_KERNELS",
    "LINEAR_KERNELS",
    "CpuOptions",
    "kernel_summary",
    "nbits_block_size",
    "pack_nbits",
    "rewrite_cpu",
)
