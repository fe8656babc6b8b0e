"""Reuse of unchanged sub-computations across the quantizer's many calibration forwards.

PTQ runs the same calibration batches through (nearly) the same model dozens of times: GPTQ
collects each stage's Hessian on a full forward, sensitivity sweeps change one layer at a time.
Every module call that *finishes before the first changed layer runs* must return what it
returned last time (causality: its inputs cannot depend on the change), so it can be skipped.

How: one traced forward records, per module, the global order of its calls (start, end). *Cut*
modules are the direct children of the root and of every ``nn.ModuleList`` (stems, blocks,
heads). When a cut module is called during a cached forward, its output is looked up by
(batch, module, call index) and returned if the *signature* of every module whose first call
starts before that call ends is unchanged since the output was stored; otherwise it runs and
the new output is stored. A signature is (module identity, identity/version/storage of each of
its own parameters and buffers), so in-place edits (``mul_``, ``copy_``), ``.data`` swaps and
replaced modules (fake-quant layers) all invalidate. Parameters of modules that are never
called as modules (e.g. a root's positional embeddings) are part of every signature.
Additionally, :func:`cached_forward` can stop the forward (``stop_after``) once given layers
have had all their calls, which is all that Hessian/statistics collection needs.

The cache is per model object (weakly referenced) and per batch object; results are identical
to uncached forwards (tested). ``DAPTQ_FORWARD_CACHE=0`` switches it off.
"""

from __future__ import annotations

import logging
import os
import weakref
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

logger = logging.getLogger(__name__)

ENV_SWITCH = "DAPTQ_FORWARD_CACHE"
MAX_BYTES_PER_MODEL = 768 * 1024 * 1024


class StopForward(Exception):  # noqa: N818 - control flow, not an error
    """Raised inside a forward once every requested layer has run its last call."""


def enabled() -> bool:
    """Whether forwards are cached (``DAPTQ_FORWARD_CACHE=0`` disables)."""
    return os.environ.get(ENV_SWITCH, "1") not in ("0", "false", "no", "off")


@dataclass
class _Timeline:
    """Call structure of one model architecture: per module the (start, end) event of each call."""

    calls: dict[str, list[tuple[int, int]]]
    cuts: list[str]
    uncalled: list[str]
    # per (cut, call index): modules whose first call starts before that call ends
    deps: dict[tuple[str, int], list[str]] = field(default_factory=dict)

    def n_calls(self, name: str) -> int:
        return len(self.calls.get(name, ()))


_TIMELINES: dict[tuple, _Timeline] = {}


def _structure_key(model: nn.Module, batch: Mapping[str, Any]) -> tuple:
    """Architecture key: module names (not types: fake-quant layers replace Linears in place)."""
    shapes = tuple((k, tuple(v.shape[1:])) for k, v in sorted(batch.items()) if isinstance(v, torch.Tensor))
    return (type(model).__qualname__, hash(tuple(n for n, _ in model.named_modules())), shapes)


def _cut_names(model: nn.Module) -> list[str]:
    cuts = []
    for name, mod in model.named_modules():
        if not name:
            continue
        parent_name, _, _ = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        is_leaf = not any(True for _ in mod.children())
        if is_leaf:
            continue
        if parent is model or isinstance(parent, nn.ModuleList):
            cuts.append(name)
    return cuts


@torch.no_grad()
def _trace(model: nn.Module, run: Callable[[], Any]) -> tuple[_Timeline, Any]:
    """Run the forward once with event hooks on every module; returns (timeline, output)."""
    counter = [0]
    calls: dict[str, list[list[int]]] = {}
    handles = []
    for name, mod in model.named_modules():
        if not name:
            continue

        def pre(m, args, n=name):
            calls.setdefault(n, []).append([counter[0], -1])
            counter[0] += 1

        def post(m, args, out, n=name):
            for c in reversed(calls[n]):
                if c[1] < 0:
                    c[1] = counter[0]
                    break
            counter[0] += 1

        handles.append(mod.register_forward_pre_hook(pre))
        handles.append(mod.register_forward_hook(post))
    try:
        result = run()
    finally:
        for h in handles:
            h.remove()
    frozen = {n: [(s, e) for s, e in c] for n, c in calls.items()}
    uncalled = [n for n, _ in model.named_modules() if n not in frozen]
    first = {n: c[0][0] for n, c in frozen.items()}
    cuts = [c for c in _cut_names(model) if c in frozen]
    tl = _Timeline(calls=frozen, cuts=cuts, uncalled=uncalled)
    for c in cuts:
        for k, (_, end) in enumerate(frozen[c]):
            tl.deps[(c, k)] = [n for n, s in first.items() if s < end]
    return tl, result


def _module_signature(mod: nn.Module) -> tuple:
    own = [*mod._parameters.values(), *mod._buffers.values()]
    return (id(mod), tuple((id(t), t._version, t.data_ptr()) if t is not None else None for t in own))


def _clone(out: Any) -> Any:
    if isinstance(out, torch.Tensor):
        return out.detach().clone()
    if isinstance(out, tuple):
        return tuple(_clone(o) for o in out)
    if isinstance(out, list):
        return [_clone(o) for o in out]
    raise TypeError("uncacheable output")


def _nbytes(out: Any) -> int:
    if isinstance(out, torch.Tensor):
        return out.numel() * out.element_size()
    return sum(_nbytes(o) for o in out)


def _cacheable(out: Any) -> bool:
    if isinstance(out, torch.Tensor):
        return not out.requires_grad
    if isinstance(out, (tuple, list)):
        return all(_cacheable(o) for o in out)
    return False


class _ModelCache:
    def __init__(self) -> None:
        self.entries: dict[tuple[int, str, int], tuple[int, Any]] = {}
        self.batches: dict[int, Any] = {}  # keep batch objects alive so ids stay unique
        self.nbytes = 0
        self.hits = 0
        self.misses = 0


_CACHES: weakref.WeakKeyDictionary[nn.Module, _ModelCache] = weakref.WeakKeyDictionary()


def clear(model: nn.Module | None = None) -> None:
    """Drop the cached outputs of ``model`` (all models when None)."""
    if model is None:
        _CACHES.clear()
    else:
        _CACHES.pop(model, None)


def stats(model: nn.Module) -> dict[str, int]:
    """Hits, misses and stored bytes of ``model``'s cache."""
    c = _CACHES.get(model)
    return (
        {"hits": c.hits, "misses": c.misses, "bytes": c.nbytes} if c else {"hits": 0, "misses": 0, "bytes": 0}
    )


@torch.no_grad()
def cached_forward(
    model: nn.Module,
    run: Callable[[], Any],
    batch: Mapping[str, Any],
    keep: Iterable[str] = (),
    stop_after: Iterable[str] = (),
) -> Any:
    """``run()`` (one forward of ``model`` on ``batch``) with unchanged cut modules skipped.

    Args:
        model: the model ``run`` calls.
        run: zero-argument callable doing the forward (e.g. ``lambda: adapter.run(model, batch)``).
        batch: the batch object (cache key; must not be mutated between calls).
        keep: module names whose hooks must fire (cut modules containing them always run).
        stop_after: module names; the forward stops (returns None) once all of them have run
            all their calls.

    Returns:
        ``run()``'s result, or None when stopped early.
    """
    keep = list(keep)
    stop_after = list(stop_after)
    if not enabled() or torch.is_grad_enabled():
        return _run_stoppable(model, run, stop_after, None)
    key = _structure_key(model, batch)
    tl = _TIMELINES.get(key)
    if tl is None:  # the traced forward is the real one (hooks fire once; no early stop)
        tl, result = _trace(model, run)
        _TIMELINES[key] = tl
        return result
    cache = _CACHES.get(model)
    if cache is None:
        cache = _ModelCache()
        _CACHES[model] = cache
    bid = id(batch)
    cache.batches[bid] = batch
    modules = dict(model.named_modules())
    sig = {n: _module_signature(m) for n, m in modules.items()}
    global_sig = hash(tuple(sig[n] for n in tl.uncalled if n in sig))
    protected = {c for c in tl.cuts for k in keep if k == c or k.startswith(c + ".")}
    counts: dict[str, int] = {}
    installed = []

    def make_wrapper(name: str, mod: nn.Module):
        orig = mod.forward

        def wrapper(*args, **kwargs):
            k = counts.get(name, 0)
            counts[name] = k + 1
            deps = tl.deps.get((name, k))
            if name in protected or deps is None:
                return orig(*args, **kwargs)
            sk = hash((global_sig, tuple(sig.get(n) for n in deps)))
            entry = cache.entries.get((bid, name, k))
            if entry is not None and entry[0] == sk:
                cache.hits += 1
                return _clone(entry[1])
            cache.misses += 1
            out = orig(*args, **kwargs)
            if _cacheable(out):
                size = _nbytes(out)
                old = cache.entries.get((bid, name, k))
                old_size = _nbytes(old[1]) if old is not None else 0
                if cache.nbytes - old_size + size <= MAX_BYTES_PER_MODEL:
                    cache.entries[(bid, name, k)] = (sk, _clone(out))
                    cache.nbytes += size - old_size
            return out

        return wrapper

    for name in tl.cuts:
        mod = modules.get(name)
        if mod is None:
            continue
        own = mod.__dict__.get("forward")  # an instance-level forward someone else installed
        mod.forward = make_wrapper(name, mod)
        installed.append((mod, own))
    try:
        return _run_stoppable(model, run, stop_after, tl)
    finally:
        for mod, own in installed:
            if own is None:
                del mod.forward
            else:
                mod.forward = own


def _run_stoppable(
    model: nn.Module, run: Callable[[], Any], stop_after: list[str], tl: _Timeline | None
) -> Any:
    if not stop_after or tl is None:
        return run()
    need = {n: tl.n_calls(n) for n in stop_after}
    if any(v == 0 for v in need.values()):
        return run()
    seen = dict.fromkeys(need, 0)
    handles = []
    modules = dict(model.named_modules())

    def post(m, args, out, n):
        seen[n] += 1
        if all(seen[x] >= need[x] for x in need):
            raise StopForward

    for n in need:
        handles.append(modules[n].register_forward_hook(lambda m, a, o, n=n: post(m, a, o, n)))
    try:
        return run()
    except StopForward:
        return None
    finally:
        for h in handles:
            h.remove()


__all__ = ["StopForward", "cached_forward", "clear", "enabled", "stats"]
