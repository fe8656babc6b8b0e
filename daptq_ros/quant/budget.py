"""Bit budget and size accounting.

Average bits per weight is taken over all quantizable layers of the policy (the adapter's
``quantizable_layers``, float-kept ones included at 16 bits) and counts the storage overhead:
one fp16 scale (16 bits) per (row, group), plus a b-bit zero point per (row, group) when
asymmetric. A pruned (0-bit) row costs nothing. So "W4 per-channel" on a 256-input layer is
4 + 16/256 = 4.06 bits, and g128 adds 0.125.

Sizes: fp32/fp16 bytes of every parameter of the model vs the deployable size with quantized
layers bit-packed (same overhead) and every other tensor in fp16.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import nn

from daptq_ros.quant.fakequant import FLOAT_BITS, LayerSpec, n_groups

SCALE_BITS = 16


class BudgetError(ValueError):
    """The requested average-bit budget cannot be met (or is malformed)."""


def layer_shape(module: nn.Module) -> tuple[int, int]:
    """(out, in_flat) of a Linear/Conv2d (float or fake-quant)."""
    w = module.weight
    return int(w.shape[0]), int(w[0].numel())


def layer_bits(spec: LayerSpec, shape: tuple[int, int]) -> float:
    """Total storage bits of one layer's weight under ``spec`` (incl. scales/zeros)."""
    out, in_flat = shape
    if spec.is_float:
        return float(FLOAT_BITS * out * in_flat)
    ng = n_groups(in_flat, spec.group_size)
    rows = spec.channel_bits if spec.channel_bits is not None else [spec.w_bits] * out
    total = 0.0
    for b in rows:
        if b == 0:
            continue
        total += b * in_flat + ng * (SCALE_BITS + (0 if spec.symmetric else b))
    return total


def avg_bits(plan: Mapping[str, LayerSpec], shapes: Mapping[str, tuple[int, int]]) -> float:
    """Average bits per weight over ``shapes`` (layers missing from ``plan`` count as float)."""
    params = sum(o * i for o, i in shapes.values())
    if params == 0:
        raise BudgetError("no quantizable parameters")
    bits = sum(layer_bits(plan.get(n, LayerSpec(w_bits=FLOAT_BITS)), s) for n, s in shapes.items())
    return bits / params


def uniform_cost(bits: int, shape: tuple[int, int], group_size: int, symmetric: bool) -> float:
    """Storage bits of a layer quantized uniformly at ``bits``."""
    return layer_bits(LayerSpec(w_bits=bits, group_size=group_size, symmetric=symmetric), shape)


def check_budget(budget: float | None, achieved: float, method: str) -> None:
    """Raise :class:`BudgetError` if ``achieved`` exceeds ``budget`` (tolerance 1e-6)."""
    if budget is not None and achieved > budget + 1e-6:
        raise BudgetError(f"method {method!r} reached {achieved:.4f} average bits, above the budget {budget}")


def size_report(model: nn.Module, plan: Mapping[str, LayerSpec]) -> dict[str, float]:
    """Real weight bytes of the quantized model vs fp32 and fp16.

    ``plan`` maps layer names to their specs (float layers may be left out). Packed bytes round
    each quantized layer up to whole bytes.
    """
    modules = dict(model.named_modules())
    qnames = {n for n, s in plan.items() if not s.is_float}
    total_params = 0
    packed_bits = 0.0
    for name, tensor in _named_weights(model):
        owner, _, leaf = name.rpartition(".")
        if owner in qnames and leaf in ("weight_int", "weight_scale", "weight_zero", "input_scale"):
            continue
        total_params += tensor.numel()
        packed_bits += 16 * tensor.numel()
    qparams = 0
    for n in qnames:
        shape = layer_shape(modules[n])
        qparams += shape[0] * shape[1]
        total_params += shape[0] * shape[1]
        packed_bits += 8 * math.ceil(layer_bits(plan[n], shape) / 8)
    fp32 = 4.0 * total_params
    fp16 = 2.0 * total_params
    packed = packed_bits / 8
    return {
        "params_total": float(total_params),
        "params_quantized": float(qparams),
        "fp32_bytes": fp32,
        "fp16_bytes": fp16,
        "quant_bytes": packed,
        "ratio_vs_fp32": packed / fp32 if fp32 else 0.0,
        "ratio_vs_fp16": packed / fp16 if fp16 else 0.0,
    }


def _named_weights(model: nn.Module):
    seen: set[int] = set()
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if isinstance(t, torch.Tensor) and id(t) not in seen and t.is_floating_point():
            seen.add(id(t))
            yield name, t
