"""``quantvla``: selective layout + Attention Temperature Matching + Output Head Balancing.

QuantVLA (Zhang et al., CVPR 2026), without its DuQuant rotations (rounding is the recipe's
back-end). Layout: every Linear of the backbone and the action head's MLPs are quantized; kept
float: the vision encoder (Conv2d layers), the action head's attention q/k/v/o projections and
the final action layer (the last layer executed), as in the paper.

ATM, one scalar per head of every action-head attention module:
``α_h = Std(L_T) / (Std(L_Q) + 1e-6)`` with ``L = q kᵀ / sqrt(d_h)`` over all query/key pairs
(the heads here attend without masks; keys = [prefix keys; step keys], see :func:`pair_keys`),
teacher = FP model on the same inputs and noise;
``α = clip(α, α_min, α_max)`` and ``α = 1`` when ``|log α| < 0.03``. Multiplying the logits by α
is folded into head h's rows of q_proj (weight and bias, or its weight_scale if quantized);
exact because no norm follows q. OHB, one scalar per attention module:
``β = RMS(Z_T) / (RMS(Z_Q) + 1e-6)`` on o_proj's output Z, same clip/band, folded into o_proj's
weight (scale) and bias. Modules are calibrated in execution order, each after the previous ones
are corrected. Default clip [0.70, 1.40] = the range of the author repo's released α values.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
from torch import nn

from daptq_ros.quant.api import QuantContext, run_uniform
from daptq_ros.quant.calibration import capture
from daptq_ros.quant.engine import get_module, trace_layers
from daptq_ros.quant.fakequant import LayerSpec, is_quantized
from daptq_ros.quant.registry import register_method

logger = logging.getLogger(__name__)


def clip_scalar(x: torch.Tensor, lo: float, hi: float, band: float) -> torch.Tensor:
    """Clip to [lo, hi]; entries with |log x| < band become exactly 1."""
    x = x.clamp(lo, hi)
    return torch.where(x.log().abs() < band, torch.ones_like(x), x)


def scale_rows(module: nn.Module, factors: torch.Tensor) -> None:
    """Multiply output rows (and bias) of a Linear by ``factors`` (out,); quantized: via scales."""
    f = factors.float()
    with torch.no_grad():
        if is_quantized(module):
            module.weight_scale.mul_(f[:, None])
        else:
            module.weight.mul_(f[:, None])
        if module.bias is not None:
            module.bias.mul_(f)


def _collect(
    model: nn.Module, ctx: QuantContext, names: list[str], batches: list | None = None
) -> dict[str, list[torch.Tensor]]:
    outs: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    capture(
        model,
        ctx.adapter,
        ctx.sweep_batches if batches is None else batches,
        names,
        lambda *a: None,
        on_output=lambda n, m, y: outs[n].append(y),
    )
    return outs


def pair_keys(q: list[torch.Tensor], k: list[torch.Tensor]) -> list[torch.Tensor]:
    """Keys each query call attends to, from one forward's q_proj and k_proj outputs.

    A k_proj called more often than q_proj computed prefix keys first (the flow head's cached
    conditioning KV, computed once per forward, then one k/q call per flow step): each query call
    attends to [prefix keys; its own step's keys].
    """
    extra = len(k) - len(q)
    if extra < 0:
        raise ValueError(f"attention has {len(q)} query calls but only {len(k)} key calls")
    prefix = k[:extra]
    return [torch.cat([*prefix, ki], dim=1) for ki in k[extra:]]


def logit_std(q: list[torch.Tensor], k: list[torch.Tensor], heads: int) -> torch.Tensor:
    """Per-head std of q kᵀ / sqrt(d_h) over all calls (q, k: (B, L, D) each)."""
    s1 = torch.zeros(heads, dtype=torch.float64)
    s2 = torch.zeros(heads, dtype=torch.float64)
    n = 0
    for qi, ki in zip(q, k, strict=True):
        b, length, dim = qi.shape
        dh = dim // heads
        qh = qi.reshape(b, length, heads, dh).transpose(1, 2).double()
        kh = ki.reshape(b, ki.shape[1], heads, dh).transpose(1, 2).double()
        logits = qh @ kh.transpose(-1, -2) / math.sqrt(dh)
        s1 += logits.sum(dim=(0, 2, 3))
        s2 += (logits**2).sum(dim=(0, 2, 3))
        n += logits[:, 0].numel()
    mean = s1 / n
    return (s2 / n - mean**2).clamp_min(0).sqrt()


@register_method("quantvla")
class QuantVLA:
    """QuantVLA layout with ATM and OHB scalars folded into q_proj / o_proj."""

    summary = "selective layout + attention temperature matching + output head balancing"
    default_rounding = "rtn"

    @dataclass
    class Options:
        """Attributes:
        atm / ohb: enable attention temperature matching / output head balancing.
        alpha_min / alpha_max: clip of α and β. neutral_band: |log x| below it -> 1.
        keep_vision: keep Conv2d layers float. keep_head_attention: keep head q/k/v/o float.
        keep_output: keep the last executed layer (action output) float.
        """

        atm: bool = True
        ohb: bool = True
        alpha_min: float = 0.70
        alpha_max: float = 1.40
        neutral_band: float = 0.03
        keep_vision: bool = True
        keep_head_attention: bool = True
        keep_output: bool = True

        def __post_init__(self) -> None:
            if not 0 < self.alpha_min <= 1.0 <= self.alpha_max:
                raise ValueError(
                    f"need 0 < alpha_min <= 1 <= alpha_max, got {self.alpha_min}, {self.alpha_max}"
                )

    def apply(self, ctx: QuantContext) -> dict[str, LayerSpec]:
        opts = ctx.options
        head = ctx.adapter.action_head_prefix
        attn = {
            n: h for n, h in ctx.adapter.attention_modules(ctx.model).items() if head and n.startswith(head)
        }
        keep: set[str] = set()
        if opts.keep_vision:
            keep |= {n for n in ctx.targets if ctx.is_conv(n)}
        if opts.keep_head_attention:
            keep |= {f"{a}.{p}" for a in attn for p in ("q_proj", "k_proj", "v_proj", "o_proj")}
        if opts.keep_output:
            order = trace_layers(ctx.model, ctx.adapter, ctx.batches[0], ctx.targets).order
            keep |= set(order[-1:])
        plan = run_uniform(ctx, [n for n in ctx.targets if n not in keep])
        alphas, betas = {}, {}
        for name, heads in attn.items():
            if opts.atm:
                alphas[name] = self._atm(ctx, name, heads).tolist()
            if opts.ohb:
                betas[name] = float(self._ohb(ctx, name))
        ctx.extras.update({"atm_alpha": alphas, "ohb_beta": betas, "float_layers": sorted(keep)})
        return plan

    def _atm(self, ctx: QuantContext, name: str, heads: int) -> torch.Tensor:
        q, k = f"{name}.q_proj", f"{name}.k_proj"
        stds = []
        for model in (ctx.fp_model, ctx.model):
            qs, ks = [], []
            for b in ctx.sweep_batches:  # per forward, so prefix keys pair with their own steps
                out = _collect(model, ctx, [q, k], [b])
                qs += out[q]
                ks += pair_keys(out[q], out[k])
            stds.append(logit_std(qs, ks, heads))
        std_t, std_q = stds
        o = ctx.options
        alpha = clip_scalar(std_t / (std_q + 1e-6), o.alpha_min, o.alpha_max, o.neutral_band)
        qmod = get_module(ctx.model, q)
        scale_rows(qmod, alpha.repeat_interleave(qmod.weight.shape[0] // heads))
        return alpha

    def _ohb(self, ctx: QuantContext, name: str) -> torch.Tensor:
        o_name = f"{name}.o_proj"
        t, s = _collect(ctx.fp_model, ctx, [o_name]), _collect(ctx.model, ctx, [o_name])
        rms = lambda ys: torch.cat([y.reshape(-1) for y in ys]).double().pow(2).mean().sqrt()  # noqa: E731
        o = ctx.options
        beta = clip_scalar(rms(t[o_name]) / (rms(s[o_name]) + 1e-6), o.alpha_min, o.alpha_max, o.neutral_band)
        omod = get_module(ctx.model, o_name)
        scale_rows(omod, beta.expand(omod.weight.shape[0]))
        return beta
