"""Swappable Linear implementations for the GPU benchmark, and their float32 references.

Variants (names used in the benchmark tables and JSON):

=================  ==========================================================================
``bf16``           plain ``nn.Linear`` in bfloat16 (cuBLAS) — the baseline.
``w4a16_g128``     int4 group-128 weights, Triton kernel (:func:`kernels.w4a16_linear`).
``w8a16``          int8 per-channel weights, Triton kernel (:func:`kernels.w8a16_linear`).
``w4a16_g64``      int4 group-64 weights, Triton kernel.
``torch_int4_g128`` int4 group-128 through torch's tinygemm ``_weight_int4pack_mm`` (CUDA only).
``w8a8_intmm``     int8 weights and dynamic per-token int8 activations via ``torch._int_mm``.
``w4a16_f16x2_g128`` int4 group-128, K-major words, packed fp16x2 GEMV with inline PTX
                   (:func:`kernels.w4a16_f16x2_linear`) for ≤ 8 tokens; more tokens dequantize
                   to bf16 and run cuBLAS (a decode-step kernel, not a prefill one).
``w4a16_fused_g128`` the ``w4a16_f16x2_g128`` trunk run as one persistent kernel for one token
                   (:class:`daptq_ros.gpu.fused.FusedTrunk`: LayerNorm, attention, GELU and
                   residuals fused, grid barriers, L2 weight prefetch); trunks only, M = 1.
=================  ==========================================================================

:func:`quantize_model` deep-copies a bf16 model and replaces every eligible ``nn.Linear``;
layers whose shapes the kernels cannot take stay ``nn.Linear`` (listed in the returned report).
:func:`reference_model` turns any of these models into a float32 model computing the same
quantized function with plain torch ops (dequantized weights; fake-quantized activations for
``w8a8_intmm``): the benchmark's correctness reference.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from daptq_ros.gpu import kernels
from daptq_ros.gpu.packing import (
    Int4KMajorWeight,
    Int4Weight,
    Int8Weight,
    quantize_int4_groupwise,
    quantize_int8_per_channel,
    quantize_rows_int8,
    to_torch_int4pack_layout,
)

log = logging.getLogger(__name__)

# Run order: the tuner's time budget goes to the first Triton variants first.
VARIANTS = ("bf16", "w4a16_g128", "w8a16", "w4a16_g64", "torch_int4_g128", "w8a8_intmm", "w4a16_f16x2_g128",
            "w4a16_fused_g128")
TRITON_VARIANTS = ("w8a16", "w4a16_g128", "w4a16_g64", "w4a16_f16x2_g128", "w4a16_fused_g128")
# Variants that replace the whole model rather than its Linears (built from another variant's model).
WHOLE_MODEL_VARIANTS = {"w4a16_fused_g128": "w4a16_f16x2_g128"}
# Fallback group when K is not a multiple of the requested one (the policy's d_model = 192).
_FALLBACK_GROUP = 64


class QuantLinear(nn.Module):
    """Base of the quantized Linears: shapes, bias and the bytes the weights occupy."""

    variant = "base"

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        bias = linear.bias.detach().to(torch.bfloat16).contiguous() if linear.bias is not None else None
        self.register_buffer("bias", bias)

    def qweight(self) -> Int8Weight | Int4Weight | Int4KMajorWeight:
        """The packed weight the kernel reads."""
        raise NotImplementedError

    def weight_nbytes(self) -> int:
        """Bytes of integers + scales the forward streams."""
        return self.qweight().nbytes

    def reference_weight(self) -> torch.Tensor:
        """The dequantized float32 weight (N, K) this layer computes with."""
        return self.qweight().dequantize(torch.float32)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, variant={self.variant}"


class W8A16Linear(QuantLinear):
    """int8 per-channel weight-only Linear (Triton)."""

    variant = "w8a16"

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__(linear)
        q = quantize_int8_per_channel(linear.weight)
        self.register_buffer("q", q.q)
        self.register_buffer("scales", q.scales)

    def qweight(self) -> Int8Weight:
        return Int8Weight(self.q, self.scales)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return kernels.w8a16_linear(x, self.qweight(), self.bias)


class W4A16Linear(QuantLinear):
    """int4 group-wise weight-only Linear (Triton)."""

    variant = "w4a16"

    def __init__(self, linear: nn.Linear, group_size: int) -> None:
        super().__init__(linear)
        q = quantize_int4_groupwise(linear.weight, group_size)
        self.group_size = group_size
        self.register_buffer("packed", q.packed)
        self.register_buffer("scales", q.scales)

    def qweight(self) -> Int4Weight:
        return Int4Weight(self.packed, self.scales, self.group_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return kernels.w4a16_linear(x, self.qweight(), self.bias)


class W4A16F16x2Linear(QuantLinear):
    """int4 group-wise weight-only Linear in K-major words: the fp16x2 GEMV (Triton + inline PTX)
    for up to ``kernels.GEMV_MAX_M`` tokens; more tokens dequantize to bf16 and run cuBLAS."""

    variant = "w4a16_f16x2"

    def __init__(self, linear: nn.Linear, group_size: int) -> None:
        super().__init__(linear)
        q = Int4KMajorWeight.from_int4(quantize_int4_groupwise(linear.weight, group_size))
        self.group_size = group_size
        self.register_buffer("words", q.words)
        self.register_buffer("scales", q.scales)

    def qweight(self) -> Int4KMajorWeight:
        return Int4KMajorWeight(self.words, self.scales, self.group_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.numel() // self.in_features <= kernels.GEMV_MAX_M:
            return kernels.w4a16_f16x2_linear(x, self.qweight(), self.bias)
        return F.linear(x, self.qweight().dequantize(x.dtype), self.bias)


class TorchInt4Linear(QuantLinear):
    """int4 group-wise Linear through torch's CUDA tinygemm kernel (``_weight_int4pack_mm``)."""

    variant = "torch_int4"

    def __init__(self, linear: nn.Linear, group_size: int) -> None:
        super().__init__(linear)
        q = quantize_int4_groupwise(linear.weight, group_size)
        self.group_size = group_size
        self._ref = q  # kept on the same device for the reference only (not counted in bytes)
        k = self.in_features
        inner_k_tiles = next((t for t in (8, 4, 2) if k % (t * 16) == 0), None)
        if inner_k_tiles is None:
            raise ValueError(f"in_features={k} is not a multiple of 32 (tinygemm inner K tiles)")
        packed_u8, scales_and_zeros = to_torch_int4pack_layout(q)
        self.register_buffer("w_int4pack", torch._convert_weight_to_int4pack(packed_u8, inner_k_tiles))
        self.register_buffer("scales_and_zeros", scales_and_zeros)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, self.in_features)
        y = torch._weight_int4pack_mm(x2.contiguous(), self.w_int4pack, self.group_size,
                                      self.scales_and_zeros)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*x.shape[:-1], self.out_features)

    def weight_nbytes(self) -> int:
        return (self.w_int4pack.numel() * self.w_int4pack.element_size()
                + self.scales_and_zeros.numel() * self.scales_and_zeros.element_size())

    def reference_weight(self) -> torch.Tensor:
        return self._ref.dequantize(torch.float32)


class W8A8Linear(QuantLinear):
    """int8 weights × dynamic per-token int8 activations through ``torch._int_mm``."""

    variant = "w8a8_intmm"

    def __init__(self, linear: nn.Linear, use_triton: bool = True) -> None:
        super().__init__(linear)
        q = quantize_int8_per_channel(linear.weight)
        self.use_triton = use_triton
        self.register_buffer("q", q.q)
        self.register_buffer("scales", q.scales)
        self.register_buffer("w_t", kernels.prepare_int_mm_weight(q))

    def qweight(self) -> Int8Weight:
        return Int8Weight(self.q, self.scales)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.qweight()
        if self.use_triton:
            try:
                return kernels.w8a8_linear(x, weight, self.w_t, self.bias, use_triton=True)
            except Exception as exc:  # keep the cuBLASLt path measurable without Triton
                if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
                    raise
                log.warning("W8A8 Triton quantize/epilogue failed (%s); using the torch ops", exc)
                self.use_triton = False
        return kernels.w8a8_linear(x, weight, self.w_t, self.bias, use_triton=False)


class FakeQuantActLinear(nn.Linear):
    """float32 reference of :class:`W8A8Linear`: per-token int8 fake-quant of x, then a float Linear."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, s = quantize_rows_int8(x.reshape(-1, self.in_features))
        xq = (q.to(torch.float32) * s).reshape(x.shape).to(x.dtype)
        return super().forward(xq)


@dataclass
class QuantReport:
    """What :func:`quantize_model` did."""

    variant: str
    quantized: list[str] = field(default_factory=list)
    kept_float: dict[str, str] = field(default_factory=dict)  # name -> reason
    groups: dict[str, int] = field(default_factory=dict)  # int4 layers: name -> group used

    def to_dict(self) -> dict:
        return {"variant": self.variant, "n_quantized": len(self.quantized), "kept_float": self.kept_float,
                "groups_used": sorted(set(self.groups.values()))}


def _variant_group(variant: str) -> int:
    return int(variant.rsplit("_g", 1)[1]) if "_g" in variant else 0


def _ineligible(variant: str, n: int, k: int, group: int) -> str | None:
    """Why a (N, K) Linear cannot take ``variant`` (None when it can)."""
    if k % 32 or n % 16:
        return f"shape ({n}, {k}) needs N % 16 == 0 and K % 32 == 0"
    if group and k % group and k % _FALLBACK_GROUP:
        return f"K={k} is not a multiple of group {group} or {_FALLBACK_GROUP}"
    return None


def make_quant_linear(linear: nn.Linear, variant: str, group: int) -> QuantLinear:
    """Build the quantized replacement of one Linear (weights quantized on the Linear's device)."""
    if variant == "w8a16":
        return W8A16Linear(linear)
    if variant.startswith("w4a16_f16x2"):
        return W4A16F16x2Linear(linear, group)
    if variant.startswith("w4a16"):
        return W4A16Linear(linear, group)
    if variant.startswith("torch_int4"):
        return TorchInt4Linear(linear, group)
    if variant == "w8a8_intmm":
        return W8A8Linear(linear, use_triton=kernels.triton_available())
    raise ValueError(f"unknown variant {variant!r}; expected one of {VARIANTS}")


@torch.no_grad()
def quantize_model(model: nn.Module, variant: str) -> tuple[nn.Module, QuantReport]:
    """Deep-copy ``model`` and replace its eligible ``nn.Linear`` layers by ``variant``.

    Args:
        model: a bf16 model (on its target device).
        variant: one of :data:`VARIANTS` (``bf16`` returns ``model`` itself, not a copy).
    """
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; expected one of {VARIANTS}")
    report = QuantReport(variant)
    if variant == "bf16":
        return model, report
    if variant in WHOLE_MODEL_VARIANTS:
        from daptq_ros.gpu.fused import FusionUnsupportedError, fuse_trunk  # imports this module

        inner, inner_report = quantize_model(model, WHOLE_MODEL_VARIANTS[variant])
        if inner_report.kept_float:
            raise FusionUnsupportedError(f"{variant}: Linears kept float: {inner_report.kept_float}")
        return fuse_trunk(inner), QuantReport(variant, inner_report.quantized, {}, inner_report.groups)
    new = copy.deepcopy(model)
    requested = _variant_group(variant)
    for name, module in list(new.named_modules()):
        if not isinstance(module, nn.Linear):
            continue
        n, k = module.out_features, module.in_features
        reason = _ineligible(variant, n, k, requested)
        if reason is not None:
            report.kept_float[name] = reason
            continue
        group = requested if not requested or k % requested == 0 else _FALLBACK_GROUP
        try:
            replacement = make_quant_linear(module, variant, group)
        except Exception as exc:
            report.kept_float[name] = f"{type(exc).__name__}: {exc}"
            log.warning("%s: %s kept float: %s", variant, name, exc)
            continue
        _set_submodule(new, name, replacement)
        report.quantized.append(name)
        if group:
            report.groups[name] = group
    return new, report


@torch.no_grad()
def reference_model(model: nn.Module) -> nn.Module:
    """float32 copy of ``model`` whose quantized Linears become float Linears of their dequantized weights
    (a whole-model variant gives the reference of the model it was built from)."""
    if hasattr(model, "reference") and callable(model.reference):
        return model.reference()
    quant = {name: m for name, m in model.named_modules() if isinstance(m, QuantLinear)}
    saved = {}
    for name, m in quant.items():  # deepcopy without the (large) quantized buffers
        saved[name] = m
        _set_submodule(model, name, nn.Identity())
    try:
        ref = copy.deepcopy(model).to(torch.float32)
    finally:
        for name, m in saved.items():
            _set_submodule(model, name, m)
    for name, m in quant.items():
        cls = FakeQuantActLinear if isinstance(m, W8A8Linear) else nn.Linear
        w = m.reference_weight()
        lin = cls(m.in_features, m.out_features, bias=m.bias is not None, device=w.device,
                  dtype=torch.float32)
        lin.weight.copy_(w)
        if m.bias is not None:
            lin.bias.copy_(m.bias.to(torch.float32))
        _set_submodule(ref, name, lin)
    return ref


def weight_nbytes(model: nn.Module) -> int:
    """Bytes a forward pass must read at least once: every parameter and buffer, as stored.

    Quantized Linears count their integers, scales and biases; tensors sharing storage (the
    column-major ``_int_mm`` view of the int8 weight) count once.
    """
    seen: set[int] = set()
    total = 0
    for t in [*model.parameters(), *model.buffers()]:
        storage = t.untyped_storage()
        if storage.data_ptr() in seen:
            continue
        seen.add(storage.data_ptr())
        total += storage.nbytes()
    return total


def linear_modules(model: nn.Module) -> list[nn.Module]:
    """All Linear-like modules (float or quantized) in forward-definition order."""
    return [m for m in model.modules() if isinstance(m, (nn.Linear, QuantLinear))]


def _set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, module)
