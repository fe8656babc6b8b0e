"""GPTQ-style error-compensating rounding (Frantar et al. 2022) on our integer grid.

Each column is rounded in turn and its rounding error, weighted by the inverse Hessian of the
layer's calibration inputs, is pushed onto the not-yet-rounded columns. Per layer:
``H = 2/n Σ x xᵀ`` (inputs of the *already quantized* upstream model, collected by
:mod:`daptq_ros.quant.engine`), dead inputs get ``H_ii = 1`` and a zero weight column, damping adds
``damp · mean(diag H)`` to the diagonal.

Group scales: without act-order they are computed lazily from the error-updated weights when
the first column of a group is reached (the reference implementation); with act-order the column
order is permuted by ``diag(H)``, so group scales are fixed up front from the original weights
("static groups") to keep groups contiguous in the stored (out, n_groups) layout.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from daptq_ros.quant.fakequant import (
    QuantizedWeight,
    compute_params,
    expand_groups,
    int_range,
    n_groups,
    row_bits,
)

logger = logging.getLogger(__name__)


@dataclass
class GPTQOptions:
    """GPTQ back-end settings.

    Attributes:
        damp: diagonal damping as a fraction of mean(diag H) (reference default 0.01).
        act_order: quantize columns in order of decreasing diag(H) (helps at <= 3 bits).
        block_size: columns per lazy-update block (speed only; no effect on the result).
    """

    damp: float = 0.01
    act_order: bool = True
    block_size: int = 128

    def __post_init__(self) -> None:
        if not 0.0 < self.damp < 1.0:
            raise ValueError(f"gptq.damp must be in (0, 1), got {self.damp}")
        if self.block_size < 1:
            raise ValueError(f"gptq.block_size must be >= 1, got {self.block_size}")


def _inverse_cholesky(H: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor of H⁻¹ with escalating damping if H is not positive definite."""
    diag_mean = torch.diag(H).mean().clamp_min(1e-12)
    eye = torch.eye(H.shape[0], dtype=H.dtype)
    for attempt in range(6):
        try:
            L = torch.linalg.cholesky(H + damp * (10**attempt) * diag_mean * eye)
            Hinv = torch.cholesky_inverse(L)
            return torch.linalg.cholesky(Hinv, upper=True)
        except torch.linalg.LinAlgError:
            logger.debug("GPTQ Hessian not PD at damp %.3g; increasing", damp * 10**attempt)
    raise RuntimeError("GPTQ: Hessian is not positive definite even with 1e5x damping")


def gptq_quantize(
    w: torch.Tensor,
    H: torch.Tensor,
    bits: int,
    group_size: int = 0,
    symmetric: bool = True,
    channel_bits: list[int] | None = None,
    clip: str = "minmax",
    options: GPTQOptions | None = None,
) -> QuantizedWeight:
    """Quantize ``w`` (out, in_flat) with Hessian ``H`` (in_flat, in_flat); returns integers+scales."""
    opts = options or GPTQOptions()
    W = w.detach().clone().double()
    H = H.detach().clone().double()
    out, cols = W.shape
    if H.shape != (cols, cols):
        raise ValueError(f"Hessian shape {tuple(H.shape)} does not match weight columns {cols}")
    rb = row_bits(out, bits, channel_bits).double()
    qmin, qmax = int_range(rb[:, None])
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0

    ng = n_groups(cols, group_size)
    scale = torch.ones(out, ng, dtype=torch.float64)
    zero = torch.zeros(out, ng, dtype=torch.float64)
    static = group_size <= 0 or opts.act_order
    if static:
        s, z = compute_params(W, rb, group_size, symmetric, clip)
        scale = s.double()
        zero = torch.zeros_like(scale) if z is None else z.double()

    perm = torch.argsort(torch.diag(H), descending=True) if opts.act_order else torch.arange(cols)
    W, H = W[:, perm], H[perm][:, perm]
    Hinv = _inverse_cholesky(H, opts.damp)
    group_of = (torch.arange(cols) // group_size if group_size > 0 else torch.zeros(cols, dtype=torch.long))[
        perm
    ]

    Q = torch.zeros_like(W)
    for i1 in range(0, cols, opts.block_size):
        i2 = min(i1 + opts.block_size, cols)
        W1 = W[:, i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            g = int(group_of[col])
            if not static and (perm[col] % group_size == 0):
                # Lazy group params from the error-updated weights of this (contiguous) group.
                hi = min(cols, col + group_size)
                cur = torch.cat([W1[:, i:], W[:, i2:]], dim=1)[:, : hi - col]
                s, z = compute_params(cur, rb, 0, symmetric, clip)
                scale[:, g] = s[:, 0].double()
                zero[:, g] = 0.0 if z is None else z[:, 0].double()
            wcol = W1[:, i]
            qcol = torch.clamp(torch.round(wcol / scale[:, g]) + zero[:, g], qmin[:, 0], qmax[:, 0])
            Q[:, col] = qcol
            deq = (qcol - zero[:, g]) * scale[:, g]
            err = (wcol - deq) / Hinv1[i, i]
            W1[:, i:] -= err[:, None] * Hinv1[i, i:][None, :]
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]

    inv = torch.argsort(perm)
    q = Q[:, inv].to(torch.int8)
    return QuantizedWeight(
        q=q,
        scale=scale.float(),
        zero=None if symmetric else zero.to(torch.int8),
        group_size=group_size,
    )


def layer_output_error(w: torch.Tensor, w_hat: torch.Tensor, H: torch.Tensor) -> float:
    """GPTQ objective tr((W - Ŵ) H (W - Ŵ)ᵀ) (proportional to the layer-output MSE)."""
    d = (w - w_hat).double()
    return float(torch.einsum("oi,ij,oj->", d, H.double(), d))


__all__ = ["GPTQOptions", "expand_groups", "gptq_quantize", "layer_output_error"]
