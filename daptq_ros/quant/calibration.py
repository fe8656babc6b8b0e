"""Calibration runner: forward calibration frames through an adapter with hooks on named layers.

Calibration data follows ONNX Runtime's reader protocol in its simplest form: an iterable of feed
dicts (here: dicts of tensors that :meth:`PolicyAdapter.run` understands). The runner turns it
into a list once (passes are repeated), checks the frame count and shows a progress bar (stderr).

Default size: 256 frames. Reason: the widest Linear of the reference policy has 768 inputs and
every frame contributes ~30-90 tokens per trunk layer (and chunk tokens × Euler steps per head
layer), so 256 frames give >10k rows per GPTQ Hessian (well conditioned, >10x its size) and
~25 frames per MT10 task; doubling it changed the reference calibration drift loss by less
than the run-to-run spread of random subsets, while every sequential GPTQ pass costs time
linear in the frame count. Per-layer sensitivity sweeps use a 64-frame subset.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence

import torch
from torch import nn
from tqdm import tqdm

from daptq_ros.quant.adapter import PolicyAdapter
from daptq_ros.quant.forward_cache import cached_forward

logger = logging.getLogger(__name__)

DEFAULT_CALIB_FRAMES = 256
DEFAULT_SWEEP_FRAMES = 64
Batch = Mapping[str, torch.Tensor]


class CalibrationError(ValueError):
    """The calibration set is unusable (too small, empty, wrong batch layout)."""


def batch_size(batch: Batch) -> int:
    """Frames in a calibration batch: the leading dim of its first tensor."""
    for value in batch.values():
        if isinstance(value, torch.Tensor) and value.dim() > 0:
            return int(value.shape[0])
    raise CalibrationError("a calibration batch contains no tensor with a batch dimension")


def prepare_batches(batches: Iterable[Batch], max_frames: int, min_frames: int) -> list[Batch]:
    """Materialize up to ``max_frames`` frames (whole batches); error below ``min_frames``."""
    out: list[Batch] = []
    frames = 0
    for batch in batches:
        if not isinstance(batch, Mapping):
            raise CalibrationError(
                f"calibration batches must be dicts of tensors, got {type(batch).__name__}"
            )
        if frames >= max_frames:
            break
        out.append(batch)
        frames += batch_size(batch)
    if frames < min_frames:
        raise CalibrationError(
            f"calibration set too small: {frames} frames, need at least {min_frames} "
            "(collect more demos/bag frames or lower min_calib_frames)"
        )
    logger.info("calibration: %d frames in %d batches", frames, len(out))
    return out


def subset(batches: Sequence[Batch], frames: int) -> list[Batch]:
    """Leading batches covering about ``frames`` frames (at least one batch)."""
    out, n = [], 0
    for b in batches:
        if out and n >= frames:
            break
        out.append(b)
        n += batch_size(b)
    return out


@torch.no_grad()
def run_batches(
    model: nn.Module, adapter: PolicyAdapter, batches: Sequence[Batch], desc: str | None = None
) -> list[torch.Tensor]:
    """Actions (B, H, A) of ``model`` for every batch (float32, detached)."""
    outs = []
    for b in tqdm(batches, desc=desc, file=sys.stderr, disable=desc is None, leave=False):
        out = cached_forward(model, lambda b=b: adapter.run(model, b), b)
        outs.append(out.detach().float())
    return outs


@torch.no_grad()
def capture(
    model: nn.Module,
    adapter: PolicyAdapter,
    batches: Sequence[Batch],
    names: Iterable[str],
    on_input: Callable[[str, nn.Module, torch.Tensor], None],
    on_output: Callable[[str, nn.Module, torch.Tensor], None] | None = None,
    desc: str | None = None,
) -> None:
    """Run all batches; call ``on_input(name, module, x)`` (and ``on_output``) for each named layer.

    Layers called several times per forward (a flow head's Euler loop) report every call.
    Module calls that cannot have changed since an earlier pass over the same batch objects are
    skipped and the forward stops after the last call of the named layers (forward_cache.py).
    """
    names = list(names)
    modules = dict(model.named_modules())
    handles = []
    for name in names:
        if name not in modules:
            raise KeyError(f"model has no module {name!r}")
        mod = modules[name]
        handles.append(
            mod.register_forward_pre_hook(lambda m, args, n=name: on_input(n, m, args[0].detach()))
        )
        if on_output is not None:
            handles.append(mod.register_forward_hook(lambda m, a, out, n=name: on_output(n, m, out.detach())))
    try:
        for b in tqdm(batches, desc=desc, file=sys.stderr, disable=desc is None, leave=False):
            cached_forward(model, lambda b=b: adapter.run(model, b), b, keep=names, stop_after=names)
    finally:
        for h in handles:
            h.remove()


# --------------------------------------------------------------------------- Hessians (GPTQ)
def layer_rows(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The rows a layer multiplies by its (flattened) weight: Linear tokens or unfolded conv patches."""
    if isinstance(module, nn.Conv2d) or hasattr(module, "kernel_size"):
        cols = torch.nn.functional.unfold(
            x, module.kernel_size, dilation=module.dilation, padding=module.padding, stride=module.stride
        )  # (B, C*k*k, L)
        if getattr(module, "groups", 1) != 1:
            raise ValueError("grouped convolutions are not supported by the Hessian collector")
        return cols.transpose(1, 2).reshape(-1, cols.shape[1])
    return x.reshape(-1, x.shape[-1])


class HessianCollector:
    """Accumulates ``H = 2/n Σ x xᵀ`` per layer from forward pre-hooks."""

    def __init__(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, int] = {}

    def __call__(self, name: str, module: nn.Module, x: torch.Tensor) -> None:
        rows = layer_rows(module, x).float()
        if name not in self.sums:
            self.sums[name] = torch.zeros(rows.shape[1], rows.shape[1])
            self.counts[name] = 0
        self.sums[name].addmm_(rows.T, rows)
        self.counts[name] += rows.shape[0]

    def hessian(self, name: str) -> torch.Tensor:
        if name not in self.sums:
            raise KeyError(f"layer {name!r} was never called on the calibration set")
        return 2.0 * self.sums[name] / max(self.counts[name], 1)


# ------------------------------------------------------------------------ activation ranges
class ActObserver:
    """Running abs-max plus a bounded random sample of input values per layer.

    The sample (≤ 2^18 values) feeds the percentile and MSE range estimators; the running
    max feeds ``minmax``.
    """

    SAMPLE_PER_CALL = 4096
    SAMPLE_CAP = 1 << 18

    def __init__(self, seed: int = 0) -> None:
        self.amax: dict[str, float] = {}
        self.samples: dict[str, list[torch.Tensor]] = {}
        self._gen = torch.Generator().manual_seed(seed)

    def __call__(self, name: str, module: nn.Module, x: torch.Tensor) -> None:
        flat = x.reshape(-1).float()
        self.amax[name] = max(self.amax.get(name, 0.0), float(flat.abs().max()) if flat.numel() else 0.0)
        bucket = self.samples.setdefault(name, [])
        if sum(t.numel() for t in bucket) >= self.SAMPLE_CAP:
            return
        if flat.numel() > self.SAMPLE_PER_CALL:
            idx = torch.randint(flat.numel(), (self.SAMPLE_PER_CALL,), generator=self._gen)
            flat = flat[idx]
        bucket.append(flat.clone())

    def scale(self, name: str, method: str = "percentile", percentile: float = 99.99) -> float:
        """Static symmetric int8 scale (= clip / 127) for layer ``name``."""
        if name not in self.amax:
            raise KeyError(f"no activations observed for layer {name!r}")
        amax = self.amax[name]
        if amax == 0.0:
            return 1.0
        sample = torch.cat(self.samples[name])
        if method == "minmax":
            clip = amax
        elif method == "percentile":
            clip = float(torch.quantile(sample.abs(), percentile / 100.0))
        elif method == "mse":
            clip = _mse_clip(sample, amax)
        else:
            raise ValueError(f"act_calibration must be percentile, mse or minmax, got {method!r}")
        return max(clip, 1e-8) / 127.0


def _mse_clip(sample: torch.Tensor, amax: float, steps: int = 64) -> float:
    """Clip value in [amax/64, amax] minimizing the int8 Q/DQ MSE on the sample."""
    best, best_err = amax, float("inf")
    for frac in torch.linspace(1.0, 1.0 / steps, steps).tolist():
        s = amax * frac / 127.0
        err = float((torch.clamp(torch.round(sample / s), -128, 127) * s - sample).pow(2).mean())
        if err < best_err:
            best, best_err = amax * frac, err
    return best
