"""Layer-wise quantization machinery shared by all methods.

- :func:`trace_layers`: one forward to learn the execution order of the target layers and which
  of them read the same input tensor (q/k/v, fc1 of parallel branches) -> *stages*;
- :func:`quantize_layers`: applies a bit plan with the RTN or GPTQ back-end. GPTQ runs stage by
  stage ("true sequential"): the Hessians of a stage are collected on the model whose earlier
  stages are already quantized, so each layer compensates upstream error too. Static int8
  activation scales are then calibrated in one pass over the weight-quantized model.
"""

from __future__ import annotations

import fnmatch
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from daptq_ros.quant.adapter import PolicyAdapter
from daptq_ros.quant.calibration import ActObserver, Batch, HessianCollector, capture
from daptq_ros.quant.fakequant import (
    LayerSpec,
    QuantizedWeight,
    flat_weight,
    is_quantized,
    make_quant_module,
    rtn_quantize,
)
from daptq_ros.quant.gptq import GPTQOptions, gptq_quantize

logger = logging.getLogger(__name__)


def match_any(name: str, patterns: Sequence[str]) -> bool:
    """True if ``name`` matches a pattern: fnmatch glob, or a regex when prefixed ``re:``."""
    for p in patterns:
        if p.startswith("re:"):
            if re.search(p[3:], name):
                return True
        elif fnmatch.fnmatchcase(name, p):
            return True
    return False


def get_module(model: nn.Module, name: str) -> nn.Module:
    try:
        return model.get_submodule(name)
    except AttributeError as err:
        raise KeyError(f"model has no module {name!r}") from err


def set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Replace submodule ``name`` (dotted path) by ``new``."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


@dataclass
class Trace:
    """Execution structure of the target layers on one batch.

    Attributes:
        order: layers in first-call order (layers never called are left out).
        stages: consecutive layers sharing one input tensor, in order.
        consumers: producer module name -> layers whose input is exactly that module's output.
        producer_of: layer -> the module whose output tensor the layer reads (if any).
    """

    order: list[str]
    stages: list[list[str]]
    consumers: dict[str, list[str]] = field(default_factory=dict)
    producer_of: dict[str, str] = field(default_factory=dict)


@torch.no_grad()
def trace_layers(model: nn.Module, adapter: PolicyAdapter, batch: Batch, layers: Sequence[str]) -> Trace:
    """Record first-call order, shared inputs and direct producers of ``layers`` on one batch."""
    wanted = set(layers)
    order: list[str] = []
    input_of: dict[str, int] = {}
    out_owner: dict[int, str] = {}
    keep: list[torch.Tensor] = []  # hold tensors so ids stay unique during the trace
    handles = []
    for name, mod in model.named_modules():
        if not name:
            continue

        def pre(m, args, n=name):
            if n in wanted and n not in input_of and args and isinstance(args[0], torch.Tensor):
                input_of[n] = id(args[0])
                keep.append(args[0])
                order.append(n)

        def post(m, args, out, n=name):
            if isinstance(out, torch.Tensor) and id(out) not in out_owner:
                out_owner[id(out)] = n
                keep.append(out)

        handles.append(mod.register_forward_pre_hook(pre))
        handles.append(mod.register_forward_hook(post))
    try:
        adapter.run(model, batch)
    finally:
        for h in handles:
            h.remove()
    stages: list[list[str]] = []
    for n in order:
        if stages and input_of[stages[-1][0]] == input_of[n]:
            stages[-1].append(n)
        else:
            stages.append([n])
    consumers: dict[str, list[str]] = {}
    producer_of: dict[str, str] = {}
    for n in order:
        owner = out_owner.get(input_of[n])
        if owner is not None and owner != n:
            producer_of[n] = owner
            consumers.setdefault(owner, []).append(n)
    missing = [n for n in layers if n not in input_of]
    if missing:
        logger.warning("layers never called on the calibration batch (left float): %s", missing[:8])
    return Trace(order=order, stages=stages, consumers=consumers, producer_of=producer_of)


@dataclass
class EngineOptions:
    """Back-end settings shared by every method (taken from the recipe)."""

    rounding: str = "gptq"
    w_clip: str = "mse"
    gptq: GPTQOptions = field(default_factory=GPTQOptions)
    act_calibration: str = "percentile"
    act_percentile: float = 99.99
    seed: int = 0


def quantize_weight(
    module: nn.Module, spec: LayerSpec, opts: EngineOptions, H: torch.Tensor | None = None
) -> QuantizedWeight:
    """Quantize one layer's float weight with the configured back-end."""
    w = flat_weight(module)
    if opts.rounding == "gptq":
        if H is None:
            raise ValueError("GPTQ rounding needs the layer's input Hessian")
        return gptq_quantize(
            w, H, spec.w_bits, spec.group_size, spec.symmetric, spec.channel_bits, opts.w_clip, opts.gptq
        )
    if opts.rounding == "rtn":
        return rtn_quantize(w, spec.w_bits, spec.group_size, spec.symmetric, spec.channel_bits, opts.w_clip)
    raise ValueError(f"rounding must be 'rtn' or 'gptq', got {opts.rounding!r}")


def quantize_layers(
    model: nn.Module,
    adapter: PolicyAdapter,
    batches: Sequence[Batch],
    plan: dict[str, LayerSpec],
    opts: EngineOptions,
    desc: str = "quantize",
) -> Trace:
    """Quantize every layer of ``plan`` (16-bit entries stay float) in place; returns the trace.

    Layers must still be float. GPTQ stages are processed in execution order.
    """
    targets = [n for n, s in plan.items() if not s.is_float]
    for n in targets:
        if is_quantized(get_module(model, n)):
            raise ValueError(f"layer {n!r} is already quantized")
    trace = trace_layers(model, adapter, batches[0], targets)
    if opts.rounding == "gptq":
        for i, stage in enumerate(trace.stages):
            hess = HessianCollector()
            capture(model, adapter, batches, stage, hess, desc=f"{desc} GPTQ {i + 1}/{len(trace.stages)}")
            for n in stage:
                mod = get_module(model, n)
                qw = quantize_weight(mod, plan[n], opts, hess.hessian(n))
                set_module(model, n, make_quant_module(mod, plan[n], qw))
    else:
        for n in trace.order:
            mod = get_module(model, n)
            set_module(model, n, make_quant_module(mod, plan[n], quantize_weight(mod, plan[n], opts)))
    calibrate_activations(model, adapter, batches, trace.order, opts, desc=f"{desc} act-scales")
    return trace


def calibrate_activations(
    model: nn.Module,
    adapter: PolicyAdapter,
    batches: Sequence[Batch],
    layers: Sequence[str],
    opts: EngineOptions,
    desc: str | None = None,
) -> None:
    """Set static int8 input scales of the quantized ``layers`` from one calibration pass.

    Input quantization is switched off during the pass (scales see the float inputs of the
    weight-quantized model, as ORT static calibration does).
    """
    static = [
        n
        for n in layers
        if is_quantized(get_module(model, n)) and get_module(model, n).input_scale is not None
    ]
    if not static:
        return
    mods = {n: get_module(model, n) for n in static}
    saved = {n: m.spec.a_bits for n, m in mods.items()}
    for m in mods.values():
        m.spec.a_bits = 16
    obs = ActObserver(seed=opts.seed)
    try:
        capture(model, adapter, batches, static, obs, desc=desc)
    finally:
        for n, m in mods.items():
            m.spec.a_bits = saved[n]
    for n, m in mods.items():
        m.input_scale.fill_(obs.scale(n, opts.act_calibration, opts.act_percentile))


def requantize(
    module: nn.Module, new_weight: torch.Tensor, opts: EngineOptions, H: torch.Tensor | None
) -> None:
    """Re-round a quantized layer onto a fresh grid for ``new_weight`` (out, in_flat), same spec."""
    tmp = nn.Linear(new_weight.shape[1], new_weight.shape[0], bias=False)
    tmp.weight.data = new_weight.float()
    qw = quantize_weight(tmp, module.spec, opts, H if opts.rounding == "gptq" else None)
    module.set_weight(qw)
