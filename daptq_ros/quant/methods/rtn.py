"""``rtn``: uniform round-to-nearest weights (baseline; per-channel or grouped grid)."""

from __future__ import annotations

from dataclasses import dataclass

from daptq_ros.quant.api import QuantContext, run_uniform
from daptq_ros.quant.fakequant import LayerSpec
from daptq_ros.quant.registry import register_method


@register_method("rtn")
class RTN:
    """Every target layer at the same bit-width (``w_bits`` or the largest fitting ``budget``)."""

    summary = "uniform round-to-nearest"
    default_rounding = "rtn"

    @dataclass
    class Options:
        """RTN has no sub-options."""

    def apply(self, ctx: QuantContext) -> dict[str, LayerSpec]:
        return run_uniform(ctx)
