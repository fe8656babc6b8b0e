"""Cross-Space Representation Compensation (DA-PTQ §3.2), folded into the producer layer.

For an interface layer l with output z (channels c), FP and quantized output statistics are
collected on identical inputs (same frames, same flow noise):

- per channel: ``g_c = clip(σ^FP_c / (σ^Q_c + ε), g_min, g_max)``, then ``z̃ = g ⊙ ẑ + d``;
- cross-channel (rank > 0): the paper gives no solver. We take the objective's λ_i → 0, W = I
  limit, whose solution is ``M0 = Σ_FP^{1/2} Σ'^{-1/2}`` (Σ' = covariance of g ⊙ ẑ, symmetric
  matrix square roots, ridge ``1e-4·mean diag`` for conditioning), and truncate
  ``M = I + shrink · SVD_r(M0 − I)`` (rank r ≪ d as in the paper; ``shrink`` plays the role of the
  λ_i pull towards I; the paper's "shrink 0.55" is used as its default value by ``daptq_paper``);
  ``d = μ^FP − M g ⊙ μ^Q`` so means match exactly on the calibration set.

Folding (zero inference cost). With producer ``ẑ = Ŵx + b``:
- the per-channel part folds exactly: ``weight_scale[c] *= g_c`` (or float rows ``W[c] *= g_c``)
  and ``b ← g ⊙ b + d``;
- a dense M cannot go into a per-channel scale. It is folded into the *producer* (W ← M G Ŵ,
  b ← M(G b) + d), which is exact for a float producer and requires re-rounding a quantized one
  onto a fresh grid (same bits/groups, the method's rounding back-end). It is not folded into
  the next consumer because in a DiT head the interface output reaches the next Linear only
  through nonlinear ops (adaLN SiLU, token concat), so no exact consumer fold exists there.
  After a re-rounding, a second per-channel (g, d) pass restores the channel statistics exactly.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from daptq_ros.quant.adapter import PolicyAdapter
from daptq_ros.quant.calibration import Batch, HessianCollector, capture
from daptq_ros.quant.engine import EngineOptions, get_module, requantize
from daptq_ros.quant.fakequant import flat_weight, is_quantized

logger = logging.getLogger(__name__)


@dataclass
class CSRCOptions:
    """CSRC settings (the paper leaves all of them unstated; these are our choices).

    Attributes:
        g_min / g_max: clip of the per-channel gain (0.5 / 2.0: at most one octave of correction).
        eps: ε in σ^FP / (σ^Q + ε).
        rank: rank r of the cross-channel correction M (0 = per-channel only).
        shrink: factor on the low-rank deviation M − I (1 = full correction).
    """

    g_min: float = 0.5
    g_max: float = 2.0
    eps: float = 1e-6
    rank: int = 4
    shrink: float = 1.0

    def __post_init__(self) -> None:
        if not 0 < self.g_min <= 1.0 <= self.g_max:
            raise ValueError(f"csrc needs 0 < g_min <= 1 <= g_max, got {self.g_min}, {self.g_max}")
        if self.rank < 0:
            raise ValueError(f"csrc rank must be >= 0, got {self.rank}")
        if not 0.0 <= self.shrink <= 1.0:
            raise ValueError(f"csrc shrink must be in [0, 1], got {self.shrink}")


class _Stats:
    """Running mean and covariance of a layer's output channels (float64)."""

    def __init__(self) -> None:
        self.n = 0
        self.s: torch.Tensor | None = None
        self.ss: torch.Tensor | None = None

    def __call__(self, name: str, module: nn.Module, out: torch.Tensor) -> None:
        z = out.reshape(-1, out.shape[-1]).double()
        if self.s is None:
            self.s = torch.zeros(z.shape[1], dtype=torch.float64)
            self.ss = torch.zeros(z.shape[1], z.shape[1], dtype=torch.float64)
        self.s += z.sum(0)
        self.ss += z.T @ z
        self.n += z.shape[0]

    def mean_cov(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.s is None or self.n < 2:
            raise RuntimeError("CSRC: the interface layer produced no outputs on the calibration set")
        mu = self.s / self.n
        return mu, self.ss / self.n - torch.outer(mu, mu)


def output_stats(model: nn.Module, adapter: PolicyAdapter, batches: Sequence[Batch], name: str):
    """(mean, covariance) of layer ``name``'s output channels over all calls on ``batches``."""
    st = _Stats()
    capture(model, adapter, batches, [name], lambda *a: None, on_output=st)
    return st.mean_cov()


def _sym_pow(C: torch.Tensor, power: float, ridge: float) -> torch.Tensor:
    evals, evecs = torch.linalg.eigh(C + ridge * torch.eye(C.shape[0], dtype=C.dtype))
    return (evecs * evals.clamp_min(ridge).pow(power)) @ evecs.T


def solve(
    mu_fp: torch.Tensor,
    cov_fp: torch.Tensor,
    mu_q: torch.Tensor,
    cov_q: torch.Tensor,
    opts: CSRCOptions,
    rank: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gains g (C,), correction A = M·diag(g) (C, C) and offset d (C,) with z̃ = A ẑ + d."""
    r = opts.rank if rank is None else rank
    g = cov_fp.diagonal().clamp_min(0).sqrt() / (cov_q.diagonal().clamp_min(0).sqrt() + opts.eps)
    g = g.clamp(opts.g_min, opts.g_max)
    A = torch.diag(g)
    if r > 0:
        cov_g = A @ cov_q @ A
        ridge = 1e-4 * float(cov_fp.diagonal().mean().clamp_min(1e-12))
        M0 = _sym_pow(cov_fp, 0.5, ridge) @ _sym_pow(cov_g, -0.5, ridge)
        U, S, Vh = torch.linalg.svd(M0 - torch.eye(len(g), dtype=M0.dtype))
        r = min(r, len(S))
        M = torch.eye(len(g), dtype=M0.dtype) + opts.shrink * (U[:, :r] * S[:r]) @ Vh[:r]
        A = M @ A
    d = mu_fp - A @ mu_q
    return g, A, d


def fold_affine(module: nn.Module, g: torch.Tensor, d: torch.Tensor) -> None:
    """Exact fold of z̃ = g ⊙ z + d into a (quantized or float) Linear producer."""
    g32, d32 = g.float(), d.float()
    with torch.no_grad():
        if is_quantized(module):
            module.weight_scale.mul_(g32[:, None])
        else:
            module.weight.mul_(g32.reshape(-1, *([1] * (module.weight.dim() - 1))))
        if module.bias is None:
            module.bias = nn.Parameter(torch.zeros_like(d32))
        module.bias.copy_(g32 * module.bias + d32)


def fold_dense(
    module: nn.Module, A: torch.Tensor, d: torch.Tensor, engine: EngineOptions, H: torch.Tensor | None
) -> None:
    """Fold z̃ = A z + d into the producer; a quantized producer is re-rounded (see module doc)."""
    W = flat_weight(module).double()
    b = (
        module.bias.detach().double()
        if module.bias is not None
        else torch.zeros(W.shape[0], dtype=torch.float64)
    )
    new_w, new_b = A @ W, A @ b + d
    with torch.no_grad():
        if is_quantized(module):
            requantize(module, new_w, engine, H)
        else:
            module.weight.copy_(new_w.reshape(module.weight.shape).float())
        if module.bias is None:
            module.bias = nn.Parameter(torch.zeros(W.shape[0]))
        module.bias.copy_(new_b.float())


def compensate_layer(
    model: nn.Module,
    fp_model: nn.Module,
    adapter: PolicyAdapter,
    batches: Sequence[Batch],
    name: str,
    opts: CSRCOptions,
    engine: EngineOptions,
) -> dict[str, float]:
    """Apply CSRC to interface layer ``name`` of ``model`` (teacher ``fp_model``); returns stats."""
    module = get_module(model, name)
    if not isinstance(module, nn.Linear) and not (
        is_quantized(module) and not hasattr(module, "kernel_size")
    ):
        raise TypeError(f"CSRC targets Linear layers; {name!r} is a {type(module).__name__}")
    mu_fp, cov_fp = output_stats(fp_model, adapter, batches, name)
    mu_q, cov_q = output_stats(model, adapter, batches, name)
    g, A, d = solve(mu_fp, cov_fp, mu_q, cov_q, opts)
    info = {
        "g_min": float(g.min()),
        "g_max": float(g.max()),
        "d_abs_mean": float(d.abs().mean()),
        "mean_err_before": float((mu_fp - mu_q).abs().mean()),
    }
    if opts.rank == 0:
        fold_affine(module, g, d)
        return info
    H = None
    if is_quantized(module) and engine.rounding == "gptq":
        hess = HessianCollector()
        capture(model, adapter, batches, [name], hess)
        H = hess.hessian(name)
    fold_dense(module, A, d, engine, H)
    if is_quantized(module):  # re-rounded: restore per-channel statistics exactly
        mu_q2, cov_q2 = output_stats(model, adapter, batches, name)
        g2, _, d2 = solve(mu_fp, cov_fp, mu_q2, cov_q2, opts, rank=0)
        fold_affine(module, g2, d2)
    info["rank"] = float(opts.rank)
    return info
