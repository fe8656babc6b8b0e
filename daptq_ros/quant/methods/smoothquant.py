"""``smoothquant``: migrate activation outliers into weights (Xiao et al. 2023), then uniform bits.

For each stage of layers sharing one input (q/k/v, fc1), with per-input-channel ranges
``max|X_j|`` (FP calibration) and ``max_l max_i |W_l[i, j]|``:
``s_j = max|X_j|^α / max|W_j|^(1−α)``; inputs are divided by s and weights multiplied by s.
The division is folded exactly into the producing LayerNorm's affine weight and bias, so the
model stays a plain graph (no extra Mul); each fold is checked on one calibration batch (float
output unchanged) and undone where the LayerNorm output also reaches another consumer. A stage
whose input does not come straight from an affine LayerNorm cannot be smoothed without an extra
op and is quantized unsmoothed (logged).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn

from daptq_ros.quant.api import QuantContext, run_uniform
from daptq_ros.quant.calibration import capture, run_batches
from daptq_ros.quant.engine import get_module, trace_layers
from daptq_ros.quant.fakequant import LayerSpec
from daptq_ros.quant.registry import register_method

logger = logging.getLogger(__name__)


@register_method("smoothquant")
class SmoothQuant:
    """SmoothQuant smoothing + uniform bits (rounding default RTN)."""

    summary = "activation smoothing folded into LayerNorm, uniform bits"
    default_rounding = "rtn"

    @dataclass
    class Options:
        """Attributes: alpha: migration strength α (paper default 0.5)."""

        alpha: float = 0.5

        def __post_init__(self) -> None:
            if not 0.0 <= self.alpha <= 1.0:
                raise ValueError(f"alpha must be in [0, 1], got {self.alpha}")

    def apply(self, ctx: QuantContext) -> dict[str, LayerSpec]:
        linear = [n for n in ctx.targets if isinstance(get_module(ctx.model, n), nn.Linear)]
        trace = trace_layers(ctx.model, ctx.adapter, ctx.batches[0], linear)
        smoothable = []
        for stage in trace.stages:
            producer = trace.producer_of.get(stage[0])
            mod = get_module(ctx.model, producer) if producer else None
            if (
                isinstance(mod, nn.LayerNorm)
                and mod.elementwise_affine
                and set(trace.consumers[producer]) == set(stage)
            ):
                smoothable.append((producer, stage))
        amax: dict[str, torch.Tensor] = {}

        def observe(name: str, module: nn.Module, x: torch.Tensor) -> None:
            cur = x.reshape(-1, x.shape[-1]).abs().amax(0)
            amax[name] = torch.maximum(amax[name], cur) if name in amax else cur

        capture(
            ctx.fp_model,
            ctx.adapter,
            ctx.batches,
            [s[0] for _, s in smoothable],
            observe,
            desc="smoothquant ranges",
        )
        alpha = ctx.options.alpha
        scales = {}
        done, reverted = [], []
        probe = ctx.batches[:1]
        reference = ctx.fp_actions[0]
        with torch.no_grad():
            for producer, stage in smoothable:
                wmax = torch.stack([get_module(ctx.model, n).weight.abs().amax(0) for n in stage]).amax(0)
                s = (
                    amax[stage[0]].clamp_min(1e-5).pow(alpha) / wmax.clamp_min(1e-5).pow(1 - alpha)
                ).clamp_min(1e-5)
                ln = get_module(ctx.model, producer)
                saved = [
                    ln.weight.clone(),
                    ln.bias.clone(),
                    *(get_module(ctx.model, n).weight.clone() for n in stage),
                ]
                ln.weight.div_(s)
                ln.bias.div_(s)
                for n in stage:
                    get_module(ctx.model, n).weight.mul_(s[None, :])
                # The fold is exact only if the LayerNorm output reaches nothing but this stage (a
                # consumer reading a slice of it, like the trunk's last-block queries, is invisible
                # to the trace): keep it only if the float model's output is unchanged.
                out = run_batches(ctx.model, ctx.adapter, probe)[0]
                err = float((out - reference).norm() / reference.norm().clamp_min(1e-12))
                if err > 1e-4:
                    ln.weight.copy_(saved[0])
                    ln.bias.copy_(saved[1])
                    for n, w in zip(stage, saved[2:], strict=True):
                        get_module(ctx.model, n).weight.copy_(w)
                    reverted.append(producer)
                    logger.info(
                        "smoothquant: %s feeds more than %s; not smoothed (rel. err %.2g)",
                        producer,
                        stage,
                        err,
                    )
                    continue
                done.append((producer, stage))
                scales[producer] = float(s.max() / s.min())
        logger.info(
            "smoothquant: smoothed %d stages, %d not exactly foldable, %d without a LayerNorm producer",
            len(done),
            len(reverted),
            len(trace.stages) - len(smoothable),
        )
        ctx.extras["smoothed"] = {p: stage for p, stage in done}
        ctx.extras["not_foldable"] = reverted
        ctx.extras["smoothing_dynamic_range"] = scales
        return run_uniform(ctx)
