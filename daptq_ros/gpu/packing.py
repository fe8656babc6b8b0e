"""Weight quantization and int4 packing for the GPU weight-only kernels (pure torch, CPU-testable).

Formats (what :mod:`daptq_ros.gpu.kernels` reads; ``W`` is an ``nn.Linear`` weight of shape (N, K),
N = out features, K = in features):

- **W8A16** (:class:`Int8Weight`): ``q`` int8 (N, K) row-major, symmetric per output channel,
  integers in [-127, 127]; ``scales`` float32 (N,). ``W ≈ q * scales[:, None]``.
- **W4A16** (:class:`Int4Weight`): symmetric group-wise along K, integers in [-8, 7] with
  ``scale = absmax / 7`` (the ``daptq_ros.quant.fakequant`` grid). ``packed`` uint8 (N, K/2),
  row-major; byte ``packed[n, j]`` holds ``q[n, 2j]`` in its **low** nibble and ``q[n, 2j+1]`` in its
  **high** nibble, both two's complement (the ONNX INT4 / ml_dtypes order). ``scales`` bfloat16
  (K/group, N), i.e. transposed so that one K-group's scales are contiguous along N (coalesced loads
  in the kernel). bf16 keeps the fp32 exponent range; its 2^-9 rounding is negligible next to
  int4's step, and the integers are computed against the *rounded* scale, so every reference here
  computes exactly the function the kernel computes.

- **W4A16, K-major** (:class:`Int4KMajorWeight`, the fp16x2 GEMV's): the same integers and scales,
  ``words`` int32 (K/8, N), offset-binary nibbles interleaved so that even and odd k share a
  16-bit lane pair (:data:`KMAJOR_NIBBLE_POS`).

The checkpoint layout of ``daptq_ros.quant.checkpoint`` (``weight_int`` int8 (N, K),
``weight_scale`` float32 (N, n_groups)) converts with :meth:`Int4Weight.from_int` /
:meth:`Int8Weight.from_int`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

log = logging.getLogger(__name__)

INT8_QMAX = 127
INT4_QMIN, INT4_QMAX = -8, 7
INT4_SCALE_DTYPE = torch.bfloat16
# Smallest scale used for an all-zero row / group (avoids 0/0; the integers are then all 0).
_MIN_SCALE = 1e-12


def _check_2d(name: str, w: torch.Tensor) -> None:
    if w.dim() != 2:
        raise ValueError(f"{name} must be 2-D (out_features, in_features), got shape {tuple(w.shape)}")


@dataclass
class Int8Weight:
    """Symmetric per-output-channel int8 weight.

    Attributes:
        q: int8 integers (N, K) in [-127, 127].
        scales: float32 per-output-channel scales (N,).
    """

    q: torch.Tensor
    scales: torch.Tensor

    @property
    def shape(self) -> tuple[int, int]:
        """(N, K) of the float weight."""
        return int(self.q.shape[0]), int(self.q.shape[1])

    @property
    def nbytes(self) -> int:
        """Bytes the kernel streams: integers plus scales."""
        return self.q.numel() * self.q.element_size() + self.scales.numel() * self.scales.element_size()

    @classmethod
    def from_int(cls, weight_int: torch.Tensor, weight_scale: torch.Tensor) -> Int8Weight:
        """Wrap checkpoint tensors (``weight_int`` (N, K), ``weight_scale`` (N,) or (N, 1))."""
        _check_2d("weight_int", weight_int)
        scales = weight_scale.reshape(-1).to(torch.float32)
        if scales.numel() != weight_int.shape[0]:
            raise ValueError(f"weight_scale has {scales.numel()} entries, expected {weight_int.shape[0]}")
        return cls(weight_int.to(torch.int8).contiguous(), scales.contiguous())

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Float weight (N, K) = q * scales."""
        return (self.q.to(torch.float32) * self.scales[:, None]).to(dtype)

    def to(self, device: torch.device | str) -> Int8Weight:
        """Copy to ``device``."""
        return Int8Weight(self.q.to(device), self.scales.to(device))


@dataclass
class Int4Weight:
    """Symmetric group-wise int4 weight, two nibbles per byte (layout in the module docstring).

    Attributes:
        packed: uint8 (N, K/2).
        scales: bfloat16 (K/group_size, N).
        group_size: K-elements per scale.
    """

    packed: torch.Tensor
    scales: torch.Tensor
    group_size: int

    @property
    def shape(self) -> tuple[int, int]:
        """(N, K) of the float weight."""
        return int(self.packed.shape[0]), int(self.packed.shape[1]) * 2

    @property
    def nbytes(self) -> int:
        """Bytes the kernel streams: packed integers plus scales."""
        return self.packed.numel() + self.scales.numel() * self.scales.element_size()

    @classmethod
    def from_int(cls, weight_int: torch.Tensor, weight_scale: torch.Tensor, group_size: int) -> Int4Weight:
        """Pack checkpoint tensors: ``weight_int`` (N, K) in [-8, 7], ``weight_scale`` (N, K/group)."""
        _check_2d("weight_int", weight_int)
        n, k = weight_int.shape
        _check_group(k, group_size)
        if tuple(weight_scale.shape) != (n, k // group_size):
            raise ValueError(
                f"weight_scale has shape {tuple(weight_scale.shape)}, expected {(n, k // group_size)}")
        lo, hi = int(weight_int.min()), int(weight_int.max())
        if lo < INT4_QMIN or hi > INT4_QMAX:
            raise ValueError(f"weight_int must lie in [{INT4_QMIN}, {INT4_QMAX}], got [{lo}, {hi}]")
        scales = weight_scale.t().to(INT4_SCALE_DTYPE).contiguous()
        return cls(pack_int4(weight_int.to(torch.int8)), scales, group_size)

    def unpacked(self) -> torch.Tensor:
        """int8 integers (N, K)."""
        return unpack_int4(self.packed)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Float weight (N, K) = q * scale of its group."""
        return dequantize_int4_groups(self.unpacked(), self.scales, self.group_size, dtype)

    def to(self, device: torch.device | str) -> Int4Weight:
        """Copy to ``device``."""
        return Int4Weight(self.packed.to(device), self.scales.to(device), self.group_size)


# Nibble position (bits 4·pos..4·pos+3) of k = 8c + j in a K-major word: even k in the low half,
# odd k in the high half (the fp16x2-friendly interleave, see ``_triton_kernels``).
KMAJOR_NIBBLE_POS = (0, 4, 1, 5, 2, 6, 3, 7)


@dataclass
class Int4KMajorWeight:
    """Symmetric group-wise int4 weight in the K-major word layout of the fp16x2 GEMV.

    Attributes:
        words: int32 (K/8, N); word (c, n) holds q[n, 8c + j] + 8 (offset binary) at nibble
            :data:`KMAJOR_NIBBLE_POS` [j].
        scales: bfloat16 (K/group_size, N), as in :class:`Int4Weight`.
        group_size: K-elements per scale.
    """

    words: torch.Tensor
    scales: torch.Tensor
    group_size: int

    @property
    def shape(self) -> tuple[int, int]:
        """(N, K) of the float weight."""
        return int(self.words.shape[1]), int(self.words.shape[0]) * 8

    @property
    def nbytes(self) -> int:
        """Bytes the kernel streams: packed integers plus scales."""
        return self.words.numel() * 4 + self.scales.numel() * self.scales.element_size()

    @classmethod
    def from_int4(cls, weight: Int4Weight) -> Int4KMajorWeight:
        """Repack an :class:`Int4Weight` (same integers and scales)."""
        return cls(pack_int4_kmajor(weight.unpacked()), weight.scales, weight.group_size)

    def unpacked(self) -> torch.Tensor:
        """int8 integers (N, K)."""
        return unpack_int4_kmajor(self.words)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Float weight (N, K) = q * scale of its group."""
        return dequantize_int4_groups(self.unpacked(), self.scales, self.group_size, dtype)

    def to(self, device: torch.device | str) -> Int4KMajorWeight:
        """Copy to ``device``."""
        return Int4KMajorWeight(self.words.to(device), self.scales.to(device), self.group_size)


def pack_int4_kmajor(q: torch.Tensor) -> torch.Tensor:
    """int4 integers (N, K), K % 8 == 0, in [-8, 7] → K-major int32 words (K/8, N) (see
    :class:`Int4KMajorWeight`)."""
    _check_2d("q", q)
    n, k = q.shape
    if k % 8:
        raise ValueError(f"K must be a multiple of 8 for K-major int4 words, got {k}")
    if q.dtype.is_floating_point:
        raise ValueError(f"pack_int4_kmajor takes integers, got {q.dtype}")
    t = (q.to(torch.int64) + 8).reshape(n, k // 8, 8)
    words = (t << _kmajor_shifts(q.device)).sum(dim=-1)  # < 2**32, no carries: the nibbles are disjoint
    words = torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)
    return words.t().contiguous()


def unpack_int4_kmajor(words: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_int4_kmajor`: int32 (K/8, N) → int8 (N, K)."""
    if words.dtype != torch.int32:
        raise ValueError(f"words must be int32, got {words.dtype}")
    w = words.t().to(torch.int64) & 0xFFFFFFFF
    t = (w[:, :, None] >> _kmajor_shifts(words.device)) & 0xF
    return (t - 8).reshape(w.shape[0], -1).to(torch.int8)


def dequantize_int4_groups(q: torch.Tensor, scales: torch.Tensor, group_size: int,
                           dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """int4 integers (N, K) times their group scales (K/group_size, N) → float weight (N, K)."""
    n, k = q.shape
    qg = q.to(torch.float32).reshape(n, k // group_size, group_size)
    return (qg * scales.to(torch.float32).t()[:, :, None]).reshape(n, k).to(dtype)


def _kmajor_shifts(device: torch.device) -> torch.Tensor:
    """Bit offset of k = 8c + j in a K-major word, for j = 0..7 (int64)."""
    return torch.tensor([4 * p for p in KMAJOR_NIBBLE_POS], dtype=torch.int64, device=device)


def _check_group(k: int, group_size: int) -> None:
    if group_size < 2 or group_size % 2:
        raise ValueError(f"group_size must be an even integer >= 2, got {group_size}")
    if k % group_size:
        raise ValueError(f"in_features={k} must be divisible by group_size={group_size}")


def quantize_int8_per_channel(w: torch.Tensor) -> Int8Weight:
    """Symmetric per-output-channel int8: ``scale = absmax / 127``, integers clamped to ±127.

    Args:
        w: float weight (N, K) (any float dtype; computed in float32).
    """
    _check_2d("w", w)
    wf = w.detach().to(torch.float32)
    scales = (wf.abs().amax(dim=1) / INT8_QMAX).clamp_min(_MIN_SCALE)
    q = torch.clamp(torch.round(wf / scales[:, None]), -INT8_QMAX, INT8_QMAX).to(torch.int8)
    return Int8Weight(q.contiguous(), scales.contiguous())


def quantize_int4_groupwise(w: torch.Tensor, group_size: int = 128) -> Int4Weight:
    """Symmetric group-wise int4 along K: ``scale = absmax / 7`` (rounded to bf16), integers in [-8, 7].

    Args:
        w: float weight (N, K); K must be divisible by ``group_size``.
        group_size: K-elements sharing one scale (128 or 64 in the benchmark).
    """
    _check_2d("w", w)
    n, k = w.shape
    _check_group(k, group_size)
    wg = w.detach().to(torch.float32).reshape(n, k // group_size, group_size)
    scales = (wg.abs().amax(dim=2) / INT4_QMAX).clamp_min(_MIN_SCALE)
    scales = scales.to(INT4_SCALE_DTYPE).to(torch.float32)  # integers against the stored scale
    q = torch.clamp(torch.round(wg / scales[:, :, None]), INT4_QMIN, INT4_QMAX).to(torch.int8)
    return Int4Weight(pack_int4(q.reshape(n, k)), scales.t().to(INT4_SCALE_DTYPE).contiguous(), group_size)


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """Pack int4 integers two per byte along the last dim: even index → low nibble, odd → high.

    Args:
        q: integer tensor (..., K), K even, values in [-8, 7].

    Returns:
        uint8 tensor (..., K/2).
    """
    if q.shape[-1] % 2:
        raise ValueError(f"last dim must be even to pack int4, got {q.shape[-1]}")
    if q.dtype.is_floating_point:
        raise ValueError(f"pack_int4 takes integers, got {q.dtype}")
    nib = q.to(torch.int16) & 0xF  # two's complement nibble
    packed = nib[..., 0::2] | (nib[..., 1::2] << 4)
    return packed.to(torch.uint8).contiguous()


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_int4`: uint8 (..., K/2) → int8 (..., K) in [-8, 7]."""
    if packed.dtype != torch.uint8:
        raise ValueError(f"packed must be uint8, got {packed.dtype}")
    b = packed.to(torch.int16)
    lo = ((b & 0xF) ^ 0x8) - 0x8  # sign-extend the nibble
    hi = ((b >> 4) ^ 0x8) - 0x8
    return torch.stack([lo, hi], dim=-1).reshape(*packed.shape[:-1], -1).to(torch.int8)


def to_torch_int4pack_layout(weight: Int4Weight) -> tuple[torch.Tensor, torch.Tensor]:
    """Convert to the inputs of ``torch._convert_weight_to_int4pack`` / ``torch._weight_int4pack_mm``.

    torch's CUDA tinygemm kernel dequantizes ``(u - 8) * scale + zero`` with unsigned ``u`` in
    [0, 15] packed as ``u[:, 2j] << 4 | u[:, 2j+1]`` (even index in the **high** nibble) and takes
    ``scales_and_zeros`` (K/group, N, 2). Our symmetric grid is ``u = q + 8`` with ``zero = 0``.

    Returns:
        (uint8 (N, K/2) in torch's nibble order, bfloat16 scales_and_zeros (K/group, N, 2)).
    """
    u = (weight.unpacked().to(torch.int16) + 8).to(torch.uint8)
    packed = (u[:, 0::2] << 4) | u[:, 1::2]
    scales = weight.scales.to(torch.bfloat16)
    scales_and_zeros = torch.stack([scales, torch.zeros_like(scales)], dim=-1).contiguous()
    return packed.contiguous(), scales_and_zeros


def quantize_rows_int8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic symmetric per-row (per-token) int8 of activations (reference for the W8A8 path).

    Returns:
        (int8 (M, K), float32 scales (M, 1)) with ``x ≈ q * scales``.
    """
    xf = x.to(torch.float32)
    scales = (xf.abs().amax(dim=-1, keepdim=True) / INT8_QMAX).clamp_min(_MIN_SCALE)
    q = torch.clamp(torch.round(xf / scales), -INT8_QMAX, INT8_QMAX).to(torch.int8)
    return q, scales


def reference_linear(x: torch.Tensor, w_float: torch.Tensor, bias: torch.Tensor | None = None,
                     out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """``x @ w_float.T + bias`` computed in float32, returned in ``out_dtype`` (default x's dtype)."""
    y = x.to(torch.float32) @ w_float.to(device=x.device, dtype=torch.float32).t()
    if bias is not None:
        y = y + bias.to(torch.float32)
    return y.to(out_dtype or x.dtype)


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """``‖out − ref‖ / ‖ref‖`` in float64; NaN/inf anywhere gives ``inf``."""
    o, r = out.detach().to(torch.float64), ref.detach().to(torch.float64)
    if not torch.isfinite(o).all():
        return float("inf")
    denom = float(torch.linalg.vector_norm(r))
    return float(torch.linalg.vector_norm(o - r)) / max(denom, 1e-30)
