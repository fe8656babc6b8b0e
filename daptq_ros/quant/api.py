"""The public verb: ``quantize_policy(model, adapter, calib_batches, recipe) -> QuantResult``.

torchao style: the model is modified in place (its Linear/Conv2d layers become fake-quant
modules); the result carries the bit plan, size accounting and the calibration drift loss.
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from daptq_ros.config_util import to_dict
from daptq_ros.quant.adapter import AdapterError, PolicyAdapter
from daptq_ros.quant.budget import BudgetError, avg_bits, check_budget, layer_shape, size_report
from daptq_ros.quant.calibration import Batch, prepare_batches, run_batches, subset
from daptq_ros.quant.drift_loss import DriftLoss
from daptq_ros.quant.engine import EngineOptions, get_module, match_any
from daptq_ros.quant.fakequant import FLOAT_BITS, INT_WEIGHT_BITS, LayerSpec
from daptq_ros.quant.recipe import QuantRecipe
from daptq_ros.quant.registry import get_method

logger = logging.getLogger(__name__)


@dataclass
class QuantContext:
    """What a method sees: the model (quantized in place), calibration data and references.

    Attributes:
        model: the policy being quantized (in place).
        adapter: its adapter.
        recipe: the full recipe; ``options`` is the method's validated sub-options.
        batches: calibration batches; ``sweep_batches`` a leading subset for sensitivity sweeps.
        fp_model: a frozen float copy (teacher for statistics and drift).
        fp_actions / fp_sweep_actions: FP actions on ``batches`` / ``sweep_batches``.
        drift: the drift loss (weights from the FP actions).
        targets: quantizable layers not matched by ``recipe.skip`` (in model order).
        shapes: (out, in_flat) of every quantizable layer (skipped ones included).
        engine: back-end settings (rounding resolved for this method).
        sensitivity: per-layer score a method wants reported (higher = more sensitive).
        extras: method-specific JSON-able details for the report.
    """

    model: nn.Module
    adapter: PolicyAdapter
    recipe: QuantRecipe
    options: Any
    batches: list[Batch]
    sweep_batches: list[Batch]
    fp_model: nn.Module
    fp_actions: list[torch.Tensor]
    fp_sweep_actions: list[torch.Tensor]
    drift: DriftLoss
    targets: list[str]
    shapes: dict[str, tuple[int, int]]
    engine: EngineOptions
    sensitivity: dict[str, float] = field(default_factory=dict)
    extras: dict[str, Any] = field(default_factory=dict)

    def is_conv(self, name: str) -> bool:
        return isinstance(get_module(self.model, name), nn.Conv2d) or hasattr(
            get_module(self.model, name), "kernel_size"
        )

    def spec(self, bits: int, channel_bits: list[int] | None = None, **overrides: Any) -> LayerSpec:
        """A LayerSpec with the recipe's grid/activation settings at ``bits``."""
        kw = dict(
            w_bits=bits,
            group_size=self.recipe.group_size,
            symmetric=self.recipe.symmetric,
            a_bits=self.recipe.a_bits,
            act_granularity=self.recipe.act_granularity,
            channel_bits=channel_bits,
        )
        kw.update(overrides)
        return LayerSpec(**kw)

    def layer_spec(self, name: str, bits: int, channel_bits: list[int] | None = None) -> LayerSpec:
        """Spec for layer ``name`` (Conv2d: per-channel; 16 bits: float)."""
        if bits == FLOAT_BITS:
            return LayerSpec(w_bits=FLOAT_BITS, a_bits=16)
        return self.spec(bits, channel_bits, group_size=0 if self.is_conv(name) else self.recipe.group_size)

    def uniform_plan(self, bits: int, layers: Sequence[str] | None = None) -> dict[str, LayerSpec]:
        return {n: self.layer_spec(n, bits) for n in (self.targets if layers is None else layers)}

    def avg_bits(self, plan: dict[str, LayerSpec]) -> float:
        return avg_bits(plan, self.shapes)

    def uniform_bits(self, layers: Sequence[str] | None = None) -> int:
        """``recipe.w_bits``, or with a budget the largest uniform bit-width that fits it."""
        if self.recipe.budget is None:
            return self.recipe.w_bits
        fits = [
            b
            for b in (*INT_WEIGHT_BITS, FLOAT_BITS)
            if self.avg_bits(self.uniform_plan(b, layers)) <= self.recipe.budget + 1e-9
        ]
        if not fits:
            lowest = self.avg_bits(self.uniform_plan(min(INT_WEIGHT_BITS), layers))
            raise BudgetError(
                f"budget {self.recipe.budget} average bits is unmeetable for method {self.recipe.method!r}: "
                f"uniform {min(INT_WEIGHT_BITS)}-bit already needs {lowest:.3f} "
                "(scales and float layers included)"
            )
        return max(fits)

    def drift_of(self, model: nn.Module | None = None, sweep: bool = True) -> float:
        """Calibration drift loss of ``model`` (default: the working model) vs FP."""
        batches, refs = (
            (self.sweep_batches, self.fp_sweep_actions) if sweep else (self.batches, self.fp_actions)
        )
        preds = run_batches(model if model is not None else self.model, self.adapter, batches)
        return self.drift.over_batches(preds, refs)


@dataclass
class QuantResult:
    """Outcome of :func:`quantize_policy`.

    Attributes:
        method: method name. recipe: the recipe as a dict.
        layers: final spec of every quantizable layer (16 = float).
        avg_bits: average bits per weight incl. scale overhead; ``budget`` the requested cap.
        drift_loss: calibration drift loss vs FP on all calibration frames.
        size: bytes vs fp32/fp16 (see :func:`daptq_ros.quant.budget.size_report`).
        sensitivity: per-layer sensitivity the method computed (may be empty).
        extras: method-specific details. seconds: wall time. calib_frames: frames used.
    """

    method: str
    recipe: dict[str, Any]
    layers: dict[str, LayerSpec]
    avg_bits: float
    budget: float | None
    drift_loss: float
    size: dict[str, float]
    sensitivity: dict[str, float]
    extras: dict[str, Any]
    seconds: float
    calib_frames: int

    def to_json(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "recipe": self.recipe,
            "avg_bits": self.avg_bits,
            "budget": self.budget,
            "drift_loss": self.drift_loss,
            "size": self.size,
            "seconds": self.seconds,
            "calib_frames": self.calib_frames,
            "layers": {
                n: {**s.to_dict(), "sensitivity": self.sensitivity.get(n)} for n, s in self.layers.items()
            },
            "extras": self.extras,
        }


def quantize_policy(
    model: nn.Module,
    adapter: PolicyAdapter,
    calib_batches: Iterable[Batch],
    recipe: QuantRecipe,
) -> QuantResult:
    """Quantize ``model`` in place with ``recipe`` using calibration batches fed through ``adapter``.

    Raises:
        AdapterError: the adapter does not fit the model.
        CalibrationError: too few calibration frames.
        BudgetError: the budget cannot be met.
        UnknownMethodError: unknown method name.
    """
    start = time.perf_counter()
    torch.manual_seed(recipe.seed)
    method_cls = get_method(recipe.method)
    options = recipe.options_for()
    model.eval()
    batches = prepare_batches(calib_batches, recipe.calib_frames, recipe.min_calib_frames)
    adapter.validate(model, batches[0])
    names = adapter.quantizable_layers(model)
    if not names:
        raise AdapterError("adapter.quantizable_layers returned no layers")
    shapes = {n: layer_shape(get_module(model, n)) for n in names}
    bad = [n for n in names if not isinstance(get_module(model, n), (nn.Linear, nn.Conv2d))]
    if bad:
        raise AdapterError(f"quantizable layers must be float nn.Linear/nn.Conv2d, got {bad[:3]}")
    fp_model = copy.deepcopy(model).eval()
    for p in fp_model.parameters():
        p.requires_grad_(False)
    fp_actions = run_batches(fp_model, adapter, batches, desc="FP reference")
    sweep = subset(batches, recipe.sweep_frames)
    drift = DriftLoss.from_reference(fp_actions, recipe.drift, adapter)
    targets = [n for n in names if not match_any(n, recipe.skip)]
    engine = EngineOptions(
        rounding=recipe.resolved_rounding(),
        w_clip=recipe.w_clip,
        gptq=recipe.gptq,
        act_calibration=recipe.act_calibration,
        act_percentile=recipe.act_percentile,
        seed=recipe.seed,
    )
    ctx = QuantContext(
        model=model,
        adapter=adapter,
        recipe=recipe,
        options=options,
        batches=batches,
        sweep_batches=sweep,
        fp_model=fp_model,
        fp_actions=fp_actions,
        fp_sweep_actions=fp_actions[: len(sweep)],
        drift=drift,
        targets=targets,
        shapes=shapes,
        engine=engine,
    )
    logger.info(
        "quantizing with %s (%d target layers, %d skipped, rounding %s)",
        recipe.method,
        len(targets),
        len(names) - len(targets),
        engine.rounding,
    )
    plan = method_cls().apply(ctx)
    full = {n: plan.get(n, LayerSpec(w_bits=FLOAT_BITS, a_bits=16)) for n in names}
    achieved = avg_bits(full, shapes)
    check_budget(recipe.budget, achieved, recipe.method)
    loss = ctx.drift_of(sweep=False)
    result = QuantResult(
        method=recipe.method,
        recipe=to_dict(recipe),
        layers=full,
        avg_bits=achieved,
        budget=recipe.budget,
        drift_loss=loss,
        size=size_report(model, full),
        sensitivity=ctx.sensitivity,
        extras=ctx.extras,
        seconds=time.perf_counter() - start,
        calib_frames=sum(int(a.shape[0]) for a in fp_actions),
    )
    logger.info("%s: %.3f avg bits, drift loss %.4g, %.1f s", recipe.method, achieved, loss, result.seconds)
    return result


def run_uniform(ctx: QuantContext, layers: Sequence[str] | None = None) -> dict[str, LayerSpec]:
    """Quantize ``layers`` (default: all targets) at :meth:`QuantContext.uniform_bits` in place."""
    from daptq_ros.quant.engine import quantize_layers

    layers = list(ctx.targets if layers is None else layers)
    bits = ctx.uniform_bits(layers)
    plan = ctx.uniform_plan(bits, layers)
    quantize_layers(ctx.model, ctx.adapter, ctx.batches, plan, ctx.engine, desc=ctx.recipe.method)
    ctx.extras["uniform_bits"] = bits
    return plan
