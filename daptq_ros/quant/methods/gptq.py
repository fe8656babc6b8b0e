"""``gptq``: uniform bit-width with GPTQ error-compensating rounding (sequential, per stage)."""

from __future__ import annotations

from dataclasses import dataclass

from daptq_ros.quant.api import QuantContext, run_uniform
from daptq_ros.quant.fakequant import LayerSpec
from daptq_ros.quant.registry import register_method


@register_method("gptq")
class GPTQ:
    """Uniform bits like ``rtn``; rounding defaults to GPTQ (settings under recipe ``gptq``)."""

    summary = "uniform bits, GPTQ rounding"
    default_rounding = "gptq"

    @dataclass
    class Options:
        """GPTQ's settings live in the recipe's shared ``gptq`` block (any method may use them)."""

    def apply(self, ctx: QuantContext) -> dict[str, LayerSpec]:
        return run_uniform(ctx)
