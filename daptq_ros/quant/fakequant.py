"""Integer weight grids and the fake-quant Linear / Conv2d modules.

The forward of every quantized layer is exactly what the ONNX QDQ export computes:
``W = (weight_int - weight_zero) * weight_scale`` (zero only when asymmetric) followed by the
float op, with an optional int8 Q/DQ on the input. Nothing else (no hidden per-channel factors):
compensation and temperature/energy scalars are folded into ``weight_scale`` and ``bias``.

Grid conventions (chosen to match the QVLA/QuantVLA code and ONNX signed QDQ):
- symmetric b-bit: ``scale = clip·absmax / qmax`` with ``qmax = 2^(b-1) - 1`` and integers clamped to
  ``[-qmax - 1, qmax]`` (at 2 bits the levels are {-2,-1,0,1}·scale), zero point 0;
- asymmetric b-bit: ``2^b`` levels between ``min(w, 0)`` and ``max(w, 0)``; the unsigned integer and
  its zero point are both shifted by ``-2^(b-1)`` so they fit a signed int8 / ONNX INTb tensor;
- groups run along the (flattened) input dimension, ``scale`` has shape (out, ceil(in / group));
  the last group may be shorter (ONNX blocked DequantizeLinear allows that);
- per-output-channel bits (QVLA) use one bit-width per row; 0 bits = pruned row (integers 0,
  scale 1, bias kept, so the channel outputs its bias).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

INT_WEIGHT_BITS = (2, 3, 4, 8)
FLOAT_BITS = 16
ACT_GRANULARITIES = ("tensor", "token")
# Candidate shrink factors of the MSE weight-clip search (1.0 = plain min/max).
_CLIP_GRID = torch.linspace(1.0, 0.5, 26)


@dataclass
class LayerSpec:
    """How one layer is quantized (stored per layer in the checkpoint metadata).

    Attributes:
        w_bits: weight bits (2, 3, 4, 8; 16 = kept float). With ``channel_bits`` the maximum.
        group_size: input-dim group size; 0 = one scale per output channel.
        symmetric: symmetric (zero point 0) or asymmetric weight grid.
        a_bits: input activation bits (8 = int8, 16 = float).
        act_granularity: ``"tensor"`` (static scale from calibration, ONNX/TRT exportable) or
            ``"token"`` (dynamic per-token asymmetric uint8, QuantVLA; not TRT exportable).
        channel_bits: optional per-output-channel bits in {0, 2, 3, 4, 8} (QVLA).
    """

    w_bits: int = 4
    group_size: int = 0
    symmetric: bool = True
    a_bits: int = 8
    act_granularity: str = "tensor"
    channel_bits: list[int] | None = None

    def __post_init__(self) -> None:
        if self.w_bits not in (*INT_WEIGHT_BITS, FLOAT_BITS):
            raise ValueError(f"w_bits must be one of {(*INT_WEIGHT_BITS, FLOAT_BITS)}, got {self.w_bits}")
        if self.group_size < 0:
            raise ValueError(f"group_size must be >= 0, got {self.group_size}")
        if self.a_bits not in (8, 16):
            raise ValueError(f"a_bits must be 8 or 16, got {self.a_bits}")
        if self.act_granularity not in ACT_GRANULARITIES:
            raise ValueError(
                f"act_granularity must be one of {ACT_GRANULARITIES}, got {self.act_granularity!r}"
            )
        if self.channel_bits is not None:
            bad = sorted({b for b in self.channel_bits if b not in (0, *INT_WEIGHT_BITS)})
            if bad:
                raise ValueError(f"channel_bits must be in {(0, *INT_WEIGHT_BITS)}, got {bad}")

    @property
    def is_float(self) -> bool:
        return self.w_bits == FLOAT_BITS

    @property
    def trt_exportable(self) -> bool:
        return self.act_granularity == "tensor"

    def to_dict(self) -> dict:
        out = asdict(self)
        out["trt_exportable"] = self.trt_exportable
        return out

    @classmethod
    def from_dict(cls, data: dict) -> LayerSpec:
        keys = {"w_bits", "group_size", "symmetric", "a_bits", "act_granularity", "channel_bits"}
        return cls(**{k: v for k, v in data.items() if k in keys})


@dataclass
class QuantizedWeight:
    """Integer weight with its scales: ``dequantize() == (q - zero) * scale`` expanded over groups."""

    q: torch.Tensor  # int8, (out, in_flat)
    scale: torch.Tensor  # float32, (out, n_groups)
    zero: torch.Tensor | None  # int8, (out, n_groups), asymmetric only
    group_size: int

    def dequantize(self) -> torch.Tensor:
        return dequantize(self.q, self.scale, self.zero, self.group_size)


def row_bits(out_features: int, bits: int, channel_bits: list[int] | torch.Tensor | None) -> torch.Tensor:
    """Per-row bit-widths as a float tensor (out,)."""
    if channel_bits is None:
        return torch.full((out_features,), float(bits))
    cb = torch.as_tensor(channel_bits, dtype=torch.float32)
    if cb.numel() != out_features:
        raise ValueError(f"channel_bits has {cb.numel()} entries for a layer with {out_features} outputs")
    return cb


def int_range(bits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Signed storage range (qmin, qmax) per row for b-bit integers (0 bits -> [0, 0])."""
    half = torch.where(bits > 0, torch.pow(2.0, bits - 1), torch.zeros_like(bits))
    return -half, torch.clamp(half - 1, min=0.0)


def n_groups(in_flat: int, group_size: int) -> int:
    return 1 if group_size <= 0 else math.ceil(in_flat / group_size)


def expand_groups(t: torch.Tensor, in_flat: int, group_size: int) -> torch.Tensor:
    """(out, n_groups) -> (out, in_flat) by repeating each group's value."""
    if group_size <= 0:
        return t[:, :1].expand(-1, in_flat)
    return t.repeat_interleave(group_size, dim=1)[:, :in_flat]


def dequantize(
    q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, group_size: int
) -> torch.Tensor:
    """Float weights (out, in_flat) from integers, scales and optional zero points."""
    in_flat = q.shape[1]
    qf = q.float()
    if zero is not None:
        qf = qf - expand_groups(zero.float(), in_flat, group_size)
    return qf * expand_groups(scale, in_flat, group_size)


def _grouped(w: torch.Tensor, group_size: int) -> torch.Tensor:
    """(out, in) -> (out, n_groups, g); a short last group is edge-padded (min/max unchanged)."""
    out, in_flat = w.shape
    if group_size <= 0:
        return w[:, None, :]
    pad = n_groups(in_flat, group_size) * group_size - in_flat
    if pad:
        w = torch.cat([w, w[:, -1:].expand(out, pad)], dim=1)
    return w.reshape(out, -1, group_size)


def compute_params(
    w: torch.Tensor,
    bits: torch.Tensor,
    group_size: int,
    symmetric: bool,
    clip: str = "minmax",
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scales (out, n_groups) and zero points for weights ``w`` (out, in) at per-row ``bits``.

    ``clip="mse"`` searches a shrink factor in [0.5, 1] per (row, group) that minimizes the
    rounding MSE of that group (the GPTQ reference code's ``mse`` option).
    """
    wg = _grouped(w.float(), group_size)
    b = bits.to(wg)[:, None, None]
    qmin, qmax = int_range(b)
    live = b > 0
    if symmetric:
        base_hi = wg.abs().amax(-1, keepdim=True)
        base_lo = -base_hi
    else:
        base_hi = wg.amax(-1, keepdim=True).clamp_min(0.0)
        base_lo = wg.amin(-1, keepdim=True).clamp_max(0.0)

    def params(shrink: float) -> tuple[torch.Tensor, torch.Tensor]:
        hi, lo = base_hi * shrink, base_lo * shrink
        if symmetric:
            scale = hi / qmax.clamp_min(1.0)
            zero = torch.zeros_like(scale)
        else:
            scale = (hi - lo) / (qmax - qmin).clamp_min(1.0)
            scale = torch.where(scale > 0, scale, torch.ones_like(scale))
            zero = torch.clamp(qmin - torch.round(lo / scale), qmin, qmax)
        scale = torch.where((scale > 0) & live, scale, torch.ones_like(scale))
        return scale, zero

    best_scale, best_zero = params(1.0)
    if clip == "mse":
        best_err = _group_err(wg, best_scale, best_zero, qmin, qmax)
        for shrink in _CLIP_GRID[1:].tolist():
            scale, zero = params(shrink)
            err = _group_err(wg, scale, zero, qmin, qmax)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_scale = torch.where(better, scale, best_scale)
            best_zero = torch.where(better, zero, best_zero)
    elif clip != "minmax":
        raise ValueError(f"weight clip must be 'minmax' or 'mse', got {clip!r}")
    scale = best_scale[..., 0].float()
    zero = None if symmetric else best_zero[..., 0].to(torch.int8)
    return scale, zero


def _group_err(wg, scale, zero, qmin, qmax) -> torch.Tensor:
    q = torch.clamp(torch.round(wg / scale) + zero, qmin, qmax)
    return ((q - zero) * scale - wg).pow(2).sum(-1, keepdim=True)


def quantize_with(
    w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, bits: torch.Tensor, group_size: int
) -> torch.Tensor:
    """Round ``w`` (out, in) onto the given grid; returns int8 integers (out, in)."""
    in_flat = w.shape[1]
    s = expand_groups(scale, in_flat, group_size)
    z = 0.0 if zero is None else expand_groups(zero.float(), in_flat, group_size)
    qmin, qmax = int_range(bits.to(w.device, torch.float32)[:, None])
    q = torch.clamp(torch.round(w.float() / s) + z, qmin, qmax)
    return q.to(torch.int8)


def rtn_quantize(
    w: torch.Tensor,
    bits: int,
    group_size: int = 0,
    symmetric: bool = True,
    channel_bits: list[int] | None = None,
    clip: str = "minmax",
) -> QuantizedWeight:
    """Round-to-nearest quantization of a 2-D weight (out, in_flat)."""
    rb = row_bits(w.shape[0], bits, channel_bits)
    scale, zero = compute_params(w, rb, group_size, symmetric, clip)
    q = quantize_with(w, scale, zero, rb, group_size)
    return QuantizedWeight(q, scale, zero, group_size)


# ----------------------------------------------------------------------------------- activations
def fake_quant_act_tensor(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Static symmetric int8 per-tensor Q/DQ (zero point 0, range [-128, 127], round half even)."""
    return torch.clamp(torch.round(x / scale), -128, 127) * scale


def fake_quant_act_token(x: torch.Tensor) -> torch.Tensor:
    """Dynamic per-token asymmetric uint8 Q/DQ over the last dim (QuantVLA's activation grid)."""
    lo = x.amin(-1, keepdim=True).clamp_max(0.0)
    hi = x.amax(-1, keepdim=True).clamp_min(0.0)
    scale = ((hi - lo) / 255.0).clamp_min(1e-8)
    zero = torch.round(-lo / scale)
    return (torch.clamp(torch.round(x / scale) + zero, 0, 255) - zero) * scale


class _QuantBase(nn.Module):
    """Shared buffers and activation path of :class:`QuantLinear` and :class:`QuantConv2d`."""

    spec: LayerSpec

    def _init_buffers(self, weight_shape: tuple[int, ...], in_flat: int, spec: LayerSpec, bias: bool) -> None:
        self.spec = replace(spec)  # own copy: specs may be shared between plan entries
        out = weight_shape[0]
        ng = n_groups(in_flat, spec.group_size)
        self.register_buffer("weight_int", torch.zeros(weight_shape, dtype=torch.int8))
        self.register_buffer("weight_scale", torch.ones(out, ng))
        self.register_buffer(
            "weight_zero", None if spec.symmetric else torch.zeros(out, ng, dtype=torch.int8)
        )
        self.bias = nn.Parameter(torch.zeros(out)) if bias else None
        quant_act = spec.a_bits == 8 and spec.act_granularity == "tensor"
        self.register_buffer("input_scale", torch.ones(()) if quant_act else None)

    def set_weight(self, qw: QuantizedWeight) -> None:
        """Install integers/scales (shapes must match this layer)."""
        self.weight_int.copy_(qw.q.reshape(self.weight_int.shape))
        self.weight_scale.copy_(qw.scale)
        if self.weight_zero is not None:
            if qw.zero is None:
                raise ValueError("asymmetric layer needs zero points")
            self.weight_zero.copy_(qw.zero)

    def dequantized_weight(self) -> torch.Tensor:
        q = self.weight_int.reshape(self.weight_int.shape[0], -1)
        w = dequantize(q, self.weight_scale, self.weight_zero, self.spec.group_size)
        return w.reshape(self.weight_int.shape)

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized float weight (read-only view for code that inspects ``.weight``)."""
        return self.dequantized_weight()

    def quant_input(self, x: torch.Tensor) -> torch.Tensor:
        if self.spec.a_bits != 8:
            return x
        if self.spec.act_granularity == "token":
            return fake_quant_act_token(x)
        return fake_quant_act_tensor(x, self.input_scale)

    def extra_repr(self) -> str:
        s = self.spec
        mixed = ", channel_bits" if s.channel_bits is not None else ""
        sym = "sym" if s.symmetric else "asym"
        return f"W{s.w_bits}A{s.a_bits} g{s.group_size} {sym} {s.act_granularity}{mixed}"


class QuantLinear(_QuantBase):
    """Fake-quant Linear: int8-stored b-bit weights, float scales, optional static int8 input."""

    def __init__(self, in_features: int, out_features: int, bias: bool, spec: LayerSpec) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self._init_buffers((out_features, in_features), in_features, spec, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self.quant_input(x), self.dequantized_weight(), self.bias)


class QuantConv2d(_QuantBase):
    """Fake-quant Conv2d; weights always per output channel (``spec.group_size`` must be 0)."""

    def __init__(self, conv: nn.Conv2d, spec: LayerSpec) -> None:
        super().__init__()
        if spec.group_size:
            raise ValueError("Conv2d weights are quantized per output channel (group_size 0)")
        self.in_channels, self.out_channels = conv.in_channels, conv.out_channels
        self.kernel_size, self.stride, self.padding = conv.kernel_size, conv.stride, conv.padding
        self.dilation, self.groups = conv.dilation, conv.groups
        if conv.padding_mode != "zeros":
            raise ValueError(f"Conv2d padding_mode {conv.padding_mode!r} is not supported")
        self._init_buffers(tuple(conv.weight.shape), conv.weight[0].numel(), spec, conv.bias is not None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(
            self.quant_input(x),
            self.dequantized_weight(),
            self.bias,
            self.stride,
            self.padding,
            self.dilation,
            self.groups,
        )


def make_quant_module(module: nn.Module, spec: LayerSpec, qw: QuantizedWeight | None = None) -> _QuantBase:
    """Fake-quant replacement for a float Linear/Conv2d (bias copied; weights from ``qw``)."""
    if isinstance(module, nn.Linear):
        new: _QuantBase = QuantLinear(module.in_features, module.out_features, module.bias is not None, spec)
    elif isinstance(module, nn.Conv2d):
        new = QuantConv2d(module, spec)
    else:
        raise TypeError(f"cannot quantize a {type(module).__name__}; only Linear and Conv2d")
    if module.bias is not None:
        new.bias.data.copy_(module.bias.detach())
    if qw is not None:
        new.set_weight(qw)
    return new.to(module.weight.device)


def flat_weight(module: nn.Module) -> torch.Tensor:
    """Float weight of a (quantized or float) Linear/Conv2d as (out, in_flat)."""
    w = module.dequantized_weight() if isinstance(module, _QuantBase) else module.weight.detach()
    return w.reshape(w.shape[0], -1).float()


def is_quantized(module: nn.Module) -> bool:
    return isinstance(module, _QuantBase)


QuantModule = _QuantBase
