"""``daptq_paper``: DA-PTQ as published (Xu et al., arXiv 2604.11572, Alg. 1), made explicit.

1. Profile on the FP model: ŝ from the virtual-chain Jacobian (see drift_loss.py), then per-layer
   scores ``φ_l = (1/R) Σ_r (1/d_out) Σ_i |∂L_drift/∂W_l|_i^(r)`` over R calibration batches.
   Unstated choices, ours: |∂L/∂W| is averaged over the input dimension too (φ = mean |grad| of
   the layer); L_drift needs a nonzero gradient at the FP model, so it is the drift-weighted
   error against the demonstrated actions (``adapter.targets``; the analogue of the paper's
   denoising loss for a policy that outputs integrated action chunks). Without targets we fall
   back to the gradient of L_drift(Q vs FP) at the RTN ``low_bits`` model (straight-through).
2. Allocate: over the action head's layers (``scope="action_head"``, Alg. 1 applies the rule to Ψ;
   ``"all"`` ranks every layer), the last ``keep_last_blocks`` DiT blocks stay float, then the top
   ``float_ratio`` (k = 30 %) of the remaining ranked layers by φ stay float; all other layers
   (backbone included) get ``low_bits`` (W4). Float = 16 bits here (BF16 in the paper).
3. Quantize with the recipe's rounding (default RTN: the paper is a plain PTQ), then CSRC on the
   interface layers of *that* quantized model (bit map first; papers.md "stage order").
The paper's "block-wise SVD rotation (16x16)", "λ_smooth = 0.15" and "6 spatial bins" have no
defined role and are not reproduced; "shrink 0.55" is used as CSRC's pull towards M = I.
"""

from __future__ import annotations

import copy
import logging
import math
import re
from dataclasses import dataclass

import torch
from torch import nn

from daptq_ros.quant.api import QuantContext
from daptq_ros.quant.csrc import CSRCOptions, compensate_layer
from daptq_ros.quant.engine import get_module, quantize_layers
from daptq_ros.quant.fakequant import FLOAT_BITS, LayerSpec, flat_weight, rtn_quantize
from daptq_ros.quant.registry import register_method

logger = logging.getLogger(__name__)


def layer_scores(ctx: QuantContext, layers: list[str], low_bits: int) -> tuple[dict[str, float], str]:
    """φ_l for ``layers``; returns (scores, which loss was differentiated)."""
    model = copy.deepcopy(ctx.fp_model)
    has_targets = all(ctx.adapter.targets(b) is not None for b in ctx.sweep_batches)
    if not has_targets:  # straight-through point: the RTN low-bit model
        with torch.no_grad():
            for n in layers:
                mod = get_module(model, n)
                wq = rtn_quantize(flat_weight(mod), low_bits, clip=ctx.recipe.w_clip).dequantize()
                mod.weight.copy_(wq.reshape(mod.weight.shape))
    params = {n: get_module(model, n).weight for n in layers}
    for p in model.parameters():
        p.requires_grad_(False)
    for p in params.values():
        p.requires_grad_(True)
    sums = dict.fromkeys(layers, 0.0)
    for b, ref in zip(ctx.sweep_batches, ctx.fp_sweep_actions, strict=True):
        target = ctx.adapter.targets(b) if has_targets else ref
        loss = ctx.drift(ctx.adapter.run(model, b), target.float())
        grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
        for n, g in zip(layers, grads, strict=True):
            sums[n] += 0.0 if g is None else float(g.abs().mean())
    r = len(ctx.sweep_batches)
    return {n: s / r for n, s in sums.items()}, ("demonstrations" if has_targets else "rtn_vs_fp")


@register_method("daptq_paper")
class DAPTQPaper:
    """The paper's DA-PTQ: φ-ranked top-k% float, rest W4, then CSRC folded into weights."""

    summary = "paper DA-PTQ: drift score top-k% float, rest W4, CSRC"
    default_rounding = "rtn"

    @dataclass
    class Options:
        """Attributes:
        float_ratio: k, fraction of ranked layers kept float (paper: 0.30).
        low_bits: bits of all other layers (paper: 4).
        keep_last_blocks: last DiT blocks never quantized (paper: 2).
        block_pattern: regex capturing the block index in head layer names.
        scope: ``action_head`` (Alg. 1) or ``all`` layers ranked.
        csrc: apply CSRC. csrc_rank / csrc_shrink / g_min / g_max: its settings.
        """

        float_ratio: float = 0.30
        low_bits: int = 4
        keep_last_blocks: int = 2
        block_pattern: str = r"blocks\.(\d+)\."
        scope: str = "action_head"
        csrc: bool = True
        csrc_rank: int = 4
        csrc_shrink: float = 0.55
        g_min: float = 0.5
        g_max: float = 2.0

        def __post_init__(self) -> None:
            if not 0.0 <= self.float_ratio <= 1.0:
                raise ValueError(f"float_ratio must be in [0, 1], got {self.float_ratio}")
            if self.low_bits not in (2, 3, 4, 8):
                raise ValueError(f"low_bits must be 2, 3, 4 or 8, got {self.low_bits}")
            if self.scope not in ("action_head", "all"):
                raise ValueError(f"scope must be 'action_head' or 'all', got {self.scope!r}")
            re.compile(self.block_pattern)

    def apply(self, ctx: QuantContext) -> dict[str, LayerSpec]:
        o = ctx.options
        head = ctx.adapter.action_head_prefix
        head_layers = [n for n in ctx.targets if head and n.startswith(head)]
        ranked = head_layers if o.scope == "action_head" else list(ctx.targets)
        pattern = re.compile(o.block_pattern)
        idx = {n: int(m.group(1)) for n in head_layers if (m := pattern.search(n))}
        last = sorted(set(idx.values()))[-o.keep_last_blocks :] if o.keep_last_blocks and idx else []
        protected = {n for n, i in idx.items() if i in last}
        scores, source = layer_scores(ctx, list(ctx.targets), o.low_bits)
        ctx.sensitivity.update(scores)
        candidates = sorted((n for n in ranked if n not in protected), key=lambda n: -scores[n])
        n_float = math.ceil(o.float_ratio * len(candidates)) if candidates else 0
        floats = protected | set(candidates[:n_float])
        plan = {n: ctx.layer_spec(n, FLOAT_BITS if n in floats else o.low_bits) for n in ctx.targets}
        quantize_layers(ctx.model, ctx.adapter, ctx.batches, plan, ctx.engine, desc="daptq_paper")
        ctx.extras.update(
            {"score_source": source, "float_layers": sorted(floats), "protected": sorted(protected)}
        )
        if o.csrc:
            copts = CSRCOptions(g_min=o.g_min, g_max=o.g_max, rank=o.csrc_rank, shrink=o.csrc_shrink)
            ctx.extras["csrc"] = {
                n: compensate_layer(ctx.model, ctx.fp_model, ctx.adapter, ctx.batches, n, copts, ctx.engine)
                for n in ctx.adapter.interface_layers(ctx.model)
                if isinstance(get_module(ctx.model, n), nn.Module)
            }
        return plan
