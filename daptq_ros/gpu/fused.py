"""One kernel for the whole one-token forward of a quantized benchmark trunk (variant ``w4a16_fused_g128``).

At batch 1 the per-Linear kernels leave two costs no matmul kernel can remove: the LayerNorm /
GELU / residual / attention kernels between them (≈ 0.04 ms on the d-4096 trunk whatever the
matmuls are, the same as its whole int4 bandwidth floor) and the ramp-up and tail of every launch,
during which HBM idles. :class:`FusedTrunk` runs the forward as one persistent launch: one
program per SM walks through the phases of every layer (LayerNorm → QKV GEMV → attention → O
GEMV + residual → LayerNorm → FC1 GEMV → GELU → FC2 GEMV + residual) with grid-wide barriers
between them. On sm_90+ (``tma``, the default) the weights stream through a ring of shared-memory
slots filled by TMA copies that keep running through the barriers (:mod:`daptq_ros.gpu.
_gluon_fused`, Gluon); elsewhere a Triton kernel loads the next GEMV's first weights into a
register ring before each barrier (:mod:`daptq_ros.gpu._triton_fused`). Both compute the same
function. :meth:`FusedTrunk.trace` records a per-phase timeline.

It computes what the ``w4a16_f16x2_g128`` variant computes — the same integers and scales, the
same packed fp16x2 products; with ``quad`` (the default) 32 of them are summed in fp16x2 before
fp32 instead of 8 — and its float32 reference is that variant's. One token only (``B·L == 1``);
any other shape runs the per-Linear f16x2 model it was built from. On the CPU
(``TRITON_INTERPRET=1``) the Triton kernel runs one launch per phase, so the tests check its code
without the barrier; the Gluon kernel is compiled for sm_90 there and run on the GPU.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
from torch import nn

from daptq_ros.gpu import kernels, timing
from daptq_ros.gpu.linear import W4A16F16x2Linear, reference_model
from daptq_ros.gpu.packing import Int4KMajorWeight, relative_error
from daptq_ros.gpu.trunk import Trunk

log = logging.getLogger(__name__)

FUSED_VARIANT = "w4a16_fused_g128"
# The offset-binary word of eight zero weights (nibble 8 each), as int32: padding rows of a tile.
_ZERO_WORD = -0x77777778
_MAX_SPIN = 1 << 22  # barrier polls (~1 s) before the kernel flags a non-resident grid
_PRODUCER_WARPS = 4  # the TMA kernel's producer warp occupies a whole warpgroup (registers, residency)
_TMA_RING_MAX = 220 * 1024  # of the 227 KB an sm_90 program may have (the rest: reductions, barriers)
_INTERPRET_PROGRAMS = 3  # programs per launch in the CPU interpreter (uneven cell splits on purpose)


class FusionUnsupportedError(ValueError):
    """The model cannot run as a fused trunk (shape, layer type or group size); the message says why."""


@dataclass(frozen=True)
class FusedConfig:
    """Launch settings of the fused trunk kernel.

    Args:
        block_n: output rows per weight tile (a power of two dividing every Linear's out_features
            is best; other sizes are padded with zero rows).
        num_warps: warps per program.
        programs_per_sm: co-resident programs per SM (1 or 2; checked against the compiled
            kernel's registers before the first persistent launch).
        persistent: one launch with grid barriers; False launches the Triton kernel once per phase
            (the ablation, and what the CPU interpreter always does). The TMA kernel is always one
            launch.
        quad: each thread dots four K-words of a column at once, summing 32 products in fp16x2
            before fp32 (fewer instructions per weight), instead of one K-word (8 products).
        l2_ahead: cells prefetched into L2 past the two-cell register ring (0 = none, up to 16);
            the next GEMV's first ones are requested before each barrier.
        ln_subset: the LayerNorm prologues normalize only the K-groups of the program's own cells
            (the statistics still come from the whole row), as the v and GELU prologues do.
        early_arrive: a program counts itself in at the grid barrier before it loads the next
            GEMV's first cells, so the arrive's memory fence does not wait for those loads.
        tma: stream the weights through a ring of ``stages`` shared-memory slots filled by TMA
            copies that run on through barriers and prologues (the Gluon kernel,
            :mod:`daptq_ros.gpu._gluon_fused`; sm_90+). ``quad``, ``l2_ahead`` and
            ``early_arrive`` are the Triton kernel's and do not apply. Where Gluon cannot run (the
            CPU interpreter) the Triton kernel computes the same function.
        stages: slots of that ring (each one cell: 32 KB of words and 2 KB of scales at 512 rows).
        ws: with ``tma``, one extra producer warp issues the copies (warp specialization), so the
            compute warps only wait for, read and release slots.
        one_rt: with ``tma``, every prologue issues all its loads (γ, β, the input token's share of
            the residual) before its first reduction: one round trip to memory instead of two.
        ahead: with ``tma`` and ``ws``, the producer loads each copy's rows from the copy list
            before it waits for the slot, not after.
        keep_l2: with ``tma``, the small constants (copy lists, GEMV table, γ, β, biases) are
            loaded with the ``evict_last`` L2 policy, so the weight stream does not evict them.
        gate: with ``tma``, ``ws`` and ``ahead``, > 0: only the first ``gate`` copies of a GEMV are
            issued before the program has passed the grid barrier preceding it (0: no gate), so
            fewer weight reads are in flight while the program waits there.
        gate_late: the gate opens once the GEMV's prologue is done (its loads are back), not at
            the barrier.
    """

    block_n: int = 512  # seventh run: 256 → 512 cut the GEMV time by ~15 % (docs/gpu_bench.md)
    num_warps: int = 8
    programs_per_sm: int = 1
    persistent: bool = True
    quad: bool = True  # sixth run: 3-5 % faster than one K-word per dot (docs/gpu_bench.md)
    l2_ahead: int = 0  # sixth run: 2 cells within 1 % of none, 4-16 cells 2-10 % slower (docs/gpu_bench.md)
    ln_subset: bool = True  # seventh run: 2 % faster
    early_arrive: bool = True  # seventh run: 4 % faster
    tma: bool = True  # eighth run: 0.078-0.081 ms, the register ring 0.092-0.093 (docs/gpu_bench.md)
    stages: int = 3  # ninth run: 3 slots faster than 2, 4 or 5 (docs/gpu_bench.md)
    ws: bool = True  # eighth run: 0.0782 against 0.0807 ms (GEMVs at DRAM pace, longer barrier waits)
    one_rt: bool = True  # ninth run: these three together 0.0761 against 0.0790 ms (4 slots, no gate)
    ahead: bool = True
    keep_l2: bool = True
    gate: int = 2  # ninth run: 0.0718-0.0723 against 0.0750-0.0752 ms without the gate, 1: 0.0742
    gate_late: bool = True  # ninth run: 0.0692 against 0.0718 ms

    def __post_init__(self) -> None:
        if self.block_n < 16 or self.block_n & (self.block_n - 1):
            raise ValueError(f"block_n must be a power of two >= 16, got {self.block_n}")
        if self.num_warps not in (1, 2, 4, 8, 16):
            raise ValueError(f"num_warps must be 1, 2, 4, 8 or 16, got {self.num_warps}")
        if self.programs_per_sm not in (1, 2):
            raise ValueError(f"programs_per_sm must be 1 or 2, got {self.programs_per_sm}")
        if not 0 <= self.l2_ahead <= 16:
            raise ValueError(f"l2_ahead must be in [0, 16], got {self.l2_ahead}")
        if not 2 <= self.stages <= 16:
            raise ValueError(f"stages must be in [2, 16], got {self.stages}")
        if not 0 <= self.gate <= 16:
            raise ValueError(f"gate must be in [0, 16], got {self.gate}")

    @property
    def active_gate(self) -> int:
        """The gate the kernel runs: ``gate`` where it applies (the TMA kernel's producer warp with
        ``ahead``), else 0."""
        return self.gate if self.tma and self.ws and self.ahead else 0


def tile_kmajor(weight: Int4KMajorWeight, block_n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """K-major words (K/8, N) and scales (K/G, N) → tile-major cells.

    Returns words (N_tiles, K/8, block_n) int32 and scales (N_tiles, K/G, block_n) bf16, both
    contiguous, so cell (tile t, group g) — the G/8 K-words × block_n rows of one group — is one
    contiguous block and a tile's cells follow each other. N is padded to a multiple of
    ``block_n`` with zero weights and zero scales.
    """
    words, scales = weight.words, weight.scales
    kw, n = words.shape
    n_tiles = math.ceil(n / block_n)
    pad = n_tiles * block_n - n
    if pad:
        words = torch.cat([words, words.new_full((kw, pad), _ZERO_WORD)], dim=1)
        scales = torch.cat([scales, scales.new_zeros((scales.shape[0], pad))], dim=1)
    tiled_w = words.reshape(kw, n_tiles, block_n).permute(1, 0, 2).contiguous()
    tiled_s = scales.reshape(scales.shape[0], n_tiles, block_n).permute(1, 0, 2).contiguous()
    return tiled_w, tiled_s


def pair_scales(tiled_scales: torch.Tensor) -> torch.Tensor:
    """Tile-major bf16 scales (N_tiles, G, block_n) → int32 words (N_tiles, ⌈G/2⌉, block_n), word
    (t, i, n) holding the scales of groups 2i (low half) and 2i + 1 (high half) of row n: the same
    bytes, in 4-byte elements the kernel loads in the weight words' own register layout. An odd G
    is padded with a zero-scale group."""
    n_tiles, n_groups, bn = tiled_scales.shape
    if n_groups % 2:
        tiled_scales = torch.cat([tiled_scales, tiled_scales.new_zeros((n_tiles, 1, bn))], dim=1)
    bits = tiled_scales.contiguous().view(torch.int16).to(torch.int32) & 0xFFFF
    lo, hi = bits[:, 0::2], bits[:, 1::2]
    return (lo | (hi << 16)).contiguous()


def tma_width(block_n: int) -> int:
    """int32 columns of the TMA views of the tile-major words and scales (a box dimension is at
    most 256 elements)."""
    return min(block_n, 256)


def tma_copy_list(meta: list[list[int]], programs: int, group_size: int, block_n: int
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Every program's TMA copies, in the order it consumes them: for each GEMV (rows of
    ``meta``, the kernel's table: word offset, scale offset, bias offset, tiles, groups per tile,
    out rows) its cells [p·C/P, (p+1)·C/P), each as (row of its words, row of its scale pair
    words) in the views of :func:`tma_width` columns.

    Returns the rows as int32 (programs, 2·most) — program p's copies at [p, 2k], [p, 2k + 1] —
    and the copies per program (programs,) int32.
    """
    tw = tma_width(block_n)
    cell_words = group_size // 8 * block_n
    per_prog: list[list[int]] = [[] for _ in range(programs)]
    for w_off, s_off, _, n_tiles, n_groups, *_ in meta:
        if w_off % tw or s_off % tw:
            raise FusionUnsupportedError(f"TMA views need {tw}-word aligned offsets, got {w_off}, {s_off}")
        n_cells, pairs = n_tiles * n_groups, (n_groups + 1) // 2
        for p in range(programs):
            for c in range(p * n_cells // programs, (p + 1) * n_cells // programs):
                t, g = divmod(c, n_groups)
                s_row = (s_off + (t * pairs + g // 2) * block_n) // tw
                per_prog[p] += [(w_off + c * cell_words) // tw, s_row]
    most = max(1, max(len(rows) for rows in per_prog) // 2)
    table = torch.zeros(programs, 2 * most, dtype=torch.int32)
    for p, rows in enumerate(per_prog):
        table[p, :len(rows)] = torch.tensor(rows, dtype=torch.int32)
    return table, torch.tensor([len(r) // 2 for r in per_prog], dtype=torch.int32)


def _concat_kmajor(parts: list[W4A16F16x2Linear]) -> tuple[Int4KMajorWeight, torch.Tensor | None]:
    """Separate q/k/v Linears as one (3d, d) weight (rows q, k, v) and bias."""
    w = Int4KMajorWeight(torch.cat([p.words for p in parts], dim=1),
                         torch.cat([p.scales for p in parts], dim=1), parts[0].group_size)
    biases = [p.bias for p in parts]
    return w, (torch.cat(biases) if all(b is not None for b in biases) else None)


def _block_linears(block: nn.Module, name: str) -> list[tuple[Int4KMajorWeight, torch.Tensor | None]]:
    """(weight, bias) of one block's QKV, O, FC1, FC2 (separate q/k/v concatenated)."""
    names = ["qkv", "o", "fc1", "fc2"] if block.fused_qkv else ["q", "k", "v", "o", "fc1", "fc2"]
    mods = {n: getattr(block, n) for n in names}
    bad = {n: type(m).__name__ for n, m in mods.items() if not isinstance(m, W4A16F16x2Linear)}
    if bad:
        raise FusionUnsupportedError(f"{name}: every Linear must be W4A16F16x2Linear, got {bad}")
    out = []
    if block.fused_qkv:
        out.append((mods["qkv"].qweight(), mods["qkv"].bias))
    else:
        out.append(_concat_kmajor([mods["q"], mods["k"], mods["v"]]))
    out += [(mods[n].qweight(), mods[n].bias) for n in ("o", "fc1", "fc2")]
    return out


def _compiled_on(device: torch.device) -> bool:
    """``device`` is a GPU running compiled Triton (not the CPU interpreter)."""
    return device.type == "cuda" and kernels._on_compiled_gpu()


def _tma_on(device: torch.device) -> bool:
    """``device`` runs compiled Triton, is sm_90 or newer (TMA) and this Triton has Gluon."""
    if not _compiled_on(device) or torch.cuda.get_device_capability(device)[0] < 9:
        return False
    try:
        import triton.experimental.gluon  # noqa: F401
    except ImportError:
        return False
    return True


def _act_stride(d: int, ffn: int) -> int:
    """int32 words of one program's packed GEMV input (the longest row, in pairs, 16-word aligned)."""
    return math.ceil(max(d, ffn) / 2 / 16) * 16


def _next_pow2(n: int) -> int:
    return 1 << max(0, math.ceil(math.log2(max(n, 1))))


class FusedTrunk(nn.Module):
    """A quantized :class:`~daptq_ros.gpu.trunk.Trunk` (every Linear ``W4A16F16x2Linear``, one
    group size dividing d_model and ffn) run as one fused kernel for one token.

    The tile-major weights, scales, LayerNorm/bias vectors and the GEMV table are this module's
    buffers (what ``weight_nbytes`` counts); the per-Linear model it was built from is kept outside
    the module tree for other shapes and the reference.
    """

    variant = FUSED_VARIANT

    def __init__(self, trunk: Trunk, config: FusedConfig | None = None) -> None:
        super().__init__()
        if not isinstance(trunk, Trunk):
            raise FusionUnsupportedError(
                f"FusedTrunk takes a daptq_ros.gpu.trunk.Trunk, got {type(trunk).__name__}")
        self.config = config or FusedConfig()
        cfg = trunk.cfg
        self.d_model, self.ffn, self.n_layers = cfg.d_model, cfg.ffn, cfg.n_layers
        self.has_bias = cfg.bias
        self.eps = float(trunk.norm.eps)
        linears = [_block_linears(b, f"blocks.{i}") for i, b in enumerate(trunk.blocks)]
        groups = {w.group_size for layer in linears for w, _ in layer}
        if len(groups) != 1:
            raise FusionUnsupportedError(f"all Linears must share one group size, got {sorted(groups)}")
        self.group_size = groups.pop()
        if self.group_size % 8 or self.group_size & (self.group_size - 1):
            raise FusionUnsupportedError(f"group size must be a power of two >= 8, got {self.group_size}")
        if self.config.quad and self.group_size < 32:
            raise FusionUnsupportedError(f"quad=True needs a group size >= 32 (4 K-words per thread), got "
                                         f"{self.group_size}; use FusedConfig(quad=False)")
        eps = {float(m.eps) for m in trunk.modules() if isinstance(m, nn.LayerNorm)}
        if len(eps) != 1:
            raise FusionUnsupportedError(f"all LayerNorms must share one eps, got {sorted(eps)}")
        self._build_tables(trunk, linears)
        self._tma_unfit = self._tma_unfit_reason() if self.config.tma else None  # (per device: _use_tma)
        object.__setattr__(self, "_inner", trunk)  # not a submodule: its buffers are not ours
        self._scratch: dict[torch.device, dict[str, torch.Tensor]] = {}
        self._launch_cache: dict[torch.device, tuple[int, dict]] = {}
        self.tuning: list[dict] = []  # fuse_trunk's candidate timings, when it chose the config
        self._checked_residency: set[tuple] = set()
        self._gluon_cache: dict[torch.device, dict] = {}
        self._tma_ok: dict[torch.device, bool] = {}

    def _tma_unfit_reason(self, programs: int | None = None) -> str | None:
        """Why the TMA kernel cannot take this model and config (four K-words per thread, a ring
        and input buffer that fit shared memory; with ``programs``, also a program's largest run
        of input groups), or None."""
        cfg = self.config
        if self.group_size < 32 or cfg.block_n < 32:
            return f"it needs a group size >= 32 and block_n >= 32, got {self.group_size} and {cfg.block_n}"
        ring = cfg.stages * (self.group_size // 8 * cfg.block_n * 4 + cfg.block_n * 4)
        # the packed GEMV input: the longest row, or a program's run of groups (_gluon_fused ACT_ROWS)
        act = 4 * max(_next_pow2(max(self.d_model, self.ffn) // 2),
                      self._subset_pairs(programs) if programs else 0)
        if ring + act > _TMA_RING_MAX:
            return (f"stages={cfg.stages} × one {cfg.block_n}-row cell = {ring} B of shared memory, with "
                    f"the {act} B input buffer more than {_TMA_RING_MAX}; use fewer stages")
        return None

    @torch.no_grad()
    def _build_tables(self, trunk: Trunk, linears: list) -> None:
        d, bn = self.d_model, self.config.block_n
        vecs = []
        for block in trunk.blocks:
            vecs += [block.norm1.weight, block.norm1.bias, block.norm2.weight, block.norm2.bias]
        vecs += [trunk.norm.weight, trunk.norm.bias]
        vec_off = (self.n_layers * 4 + 2) * d
        words, scales, meta = [], [], []
        self._gemv_cells: list[int] = []  # cells per GEMV, host-side (launch constants need no sync)
        w_off = s_off = 0
        for layer in linears:
            for w, bias in layer:
                n, _ = w.shape
                tw, ts = tile_kmajor(w, bn)
                n_tiles, n_groups = tw.shape[0], ts.shape[1]
                b_off = 0
                if bias is not None:
                    b_off = vec_off
                    padded = bias.new_zeros(n_tiles * bn)
                    padded[:n] = bias
                    vecs.append(padded)
                    vec_off += padded.numel()
                meta.append([w_off, s_off, b_off, n_tiles, n_groups, n, 0, 0])  # _triton_fused.META_*
                self._gemv_cells.append(n_tiles * n_groups)
                ts = pair_scales(ts)
                words.append(tw.reshape(-1))
                scales.append(ts.reshape(-1))
                w_off += tw.numel()
                s_off += ts.numel()
        self.register_buffer("words", torch.cat(words))
        self.register_buffer("scales", torch.cat(scales))
        self.register_buffer("vecs", torch.cat([v.reshape(-1).to(torch.float32) for v in vecs]))
        self.register_buffer("meta", torch.tensor(meta, dtype=torch.int64, device=self.words.device))
        self._meta_rows = meta  # host copy: the TMA copy lists are built from it without a sync

    # ------------------------------------------------------------------ forward

    def reference(self) -> nn.Module:
        """float32 model computing the same quantized function (the f16x2 variant's reference)."""
        return reference_model(self._inner)

    @property
    def inner(self) -> Trunk:
        """The per-Linear f16x2 model this was built from (runs every shape but one token)."""
        return self._inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Tokens (B, L, d) → (B, L, d); the fused kernel for B·L == 1, the per-Linear model otherwise."""
        if x.shape[-1] != self.d_model:
            raise ValueError(f"expected last dim {self.d_model}, got shape {tuple(x.shape)}")
        if x.numel() != self.d_model:
            return self._inner(x)
        return self.run_fused(x)

    def n_programs(self, device: torch.device) -> int:
        """Programs per launch: one or two per SM on a GPU; a few in the CPU interpreter."""
        if not _compiled_on(device):
            return _INTERPRET_PROGRAMS
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        return sms * self.config.programs_per_sm

    def _scratch_for(self, device: torch.device) -> dict[str, torch.Tensor]:
        s = self._scratch.get(device)
        if s is None:
            d, f = self.d_model, self.ffn
            bn = self.config.block_n
            z = lambda n, dt=torch.float32: torch.zeros(n, dtype=dt, device=device)  # noqa: E731
            p = self.n_programs(device)
            s = {"res": z(d), "qkv": z(math.ceil(3 * d / bn) * bn), "f": z(math.ceil(f / bn) * bn),
                 "act": z(p * _act_stride(d, f), torch.int32), "bar": z(2, torch.int32),
                 "err": z(1, torch.int32)}
            self._scratch[device] = s
        return s

    def _launch_args(self, device: torch.device) -> tuple[int, dict]:
        """Programs per launch and the kernel's constants on ``device`` (built once per device)."""
        cached = self._launch_cache.get(device)
        if cached is None:
            cached = self._launch_cache[device] = self._build_launch_args(device)
        return cached

    def _build_launch_args(self, device: torch.device) -> tuple[int, dict]:
        p = self.n_programs(device)
        on_gpu = _compiled_on(device)
        consts = {
            "D": self.d_model, "FFN": self.ffn, "GROUP": self.group_size, "BLOCK_N": self.config.block_n,
            "BLOCK_D": _next_pow2(self.d_model),
            "BLOCK_PD": _next_pow2(self.d_model // 2), "BLOCK_PF": _next_pow2(self.ffn // 2),
            "BLOCK_S": self._subset_pairs(p),
            "ACT_STRIDE": _act_stride(self.d_model, self.ffn),
            "SLICE": _next_pow2(max(math.ceil(3 * self.d_model / p), math.ceil(self.ffn / p))),
            "HAS_BIAS": self.has_bias,
            "USE_ASM": on_gpu, "MAX_SPIN": _MAX_SPIN, "TRACE": False, "QUAD": self.config.quad,
            "L2_AHEAD": self.config.l2_ahead if on_gpu else 0, "THREADS": 32 * self.config.num_warps,
            "LN_SUBSET": self.config.ln_subset, "EARLY_ARRIVE": self.config.early_arrive,
            "num_warps": self.config.num_warps,
            "num_stages": 1,
        }
        return p, consts

    def _subset_pairs(self, programs: int) -> int:
        """Pairs a prologue builds when a program's cells span fewer groups than the row: the most
        cells any program gets in any GEMV, times GROUP/2 (a power of two ≥ 16)."""
        most = max(math.ceil(cells / programs) for cells in self._gemv_cells)
        return max(16, _next_pow2(most * self.group_size // 2))

    @torch.no_grad()
    def run_fused(self, x: torch.Tensor, persistent: bool | None = None,
                  trace: torch.Tensor | None = None) -> torch.Tensor:
        """The fused forward of one token (any shape with d_model elements).

        ``trace`` (int64, programs × phases × 4, GPU only) receives every program's ``%globaltimer``
        stamps per phase (see :meth:`trace`)."""
        from daptq_ros.gpu import _triton_fused as tf

        device = x.device
        persistent = self.config.persistent if persistent is None else persistent
        if not _compiled_on(device):
            persistent = False  # the interpreter runs programs one after another: a barrier would spin
        if self.words.device != device:
            raise ValueError(f"input on {device}, weights on {self.words.device}")
        s = self._scratch_for(device)
        p, consts = self._launch_args(device)
        x1 = x.reshape(-1).to(torch.bfloat16).contiguous()
        out = torch.empty(self.d_model, dtype=torch.bfloat16, device=device)
        n_phases = 4 * self.n_layers + 1
        if trace is not None:
            if not _compiled_on(device):
                raise ValueError("tracing needs compiled Triton on a GPU (it reads %globaltimer)")
            consts = {**consts, "TRACE": True}
        args = (x1, out, self.words, self.scales, self.vecs, self.meta, s["res"], s["qkv"], s["f"], s["act"],
                s["bar"], s["err"], s["bar"] if trace is None else trace, self.n_layers)
        tma = self.config.tma and self._use_tma(device)
        if tma:
            self._run_gluon(x1, out, s, p, consts, trace, device)
        elif persistent:
            self._check_residency(tf.fused_trunk_kernel, device, (*args, 0, n_phases, self.eps), p, consts)
            tf.fused_trunk_kernel[(p,)](*args, 0, n_phases, self.eps, **consts)
        else:
            for ph in range(n_phases):
                tf.fused_trunk_kernel[(p,)](*args, ph, ph + 1, self.eps, **consts)
        capturing = device.type == "cuda" and torch.cuda.is_current_stream_capturing()
        persistent = persistent or tma
        if persistent and not capturing and int(s["err"].item()):
            self._reset(device)
            raise RuntimeError(f"fused trunk: a grid barrier timed out — not all {p} programs were resident "
                               "(another kernel or process holding SMs?); scratch buffers were reset")
        return out.view(x.shape).to(x.dtype)

    @torch.no_grad()
    def trace(self, x: torch.Tensor, repeats: int = 20) -> dict:
        """Per-phase timeline of the fused forward (GPU): every program stamps ``%globaltimer`` at
        phase start, prologue done, GEMV done and barrier passed; over ``repeats`` launches (after
        one warm-up) the median across launches of each per-phase statistic, in µs.

        Per phase: ``prologue`` / ``gemv`` / ``wait`` (barrier) durations, median and max over
        programs; ``span`` from the earliest start to the last program leaving; ``gemv_gbs``, the
        phase's weight and scale bytes over the span from the first GEMV start to the last GEMV
        end. The stamps add a program-wide sync at each point, so the total is a little longer
        than an untraced launch (``total_us`` is measured on the traced launches)."""
        device = x.device
        p = self.n_programs(device)
        n_phases = 4 * self.n_layers + 1
        buf = torch.zeros(p, n_phases, 4, dtype=torch.int64, device=device)
        self.run_fused(x, persistent=True, trace=buf)
        runs = []
        for _ in range(repeats):
            buf.zero_()
            self.run_fused(x, persistent=True, trace=buf)
            torch.cuda.synchronize(device)
            runs.append(buf.cpu().double() / 1e3)  # µs
        bn = self.config.block_n
        cell_bytes = self.group_size // 8 * bn * 4 + bn * 2  # int4 words + bf16 scales
        gemv_bytes = [cells * cell_bytes for cells in self._gemv_cells]
        names = [f"L{i // 4} {('qkv', 'o', 'fc1', 'fc2')[i % 4]}" for i in range(4 * self.n_layers)]
        names.append("final LN")
        phases = []
        for ph in range(n_phases):
            stats: dict[str, list[float]] = {}
            for t in runs:
                t0 = t[:, 0, 0].min()
                start, pro, gemv, left = (t[:, ph, k] - t0 for k in range(4))
                if ph == n_phases - 1:
                    pro = start
                vals = {"prologue": pro - start, "gemv": gemv - pro, "wait": left - gemv}
                for key, v in vals.items():
                    stats.setdefault(key + "_med", []).append(float(v.median()))
                    stats.setdefault(key + "_max", []).append(float(v.max()))
                stats.setdefault("span", []).append(float(left.max() - start.min()))
                stats.setdefault("start", []).append(float(start.min()))
                if ph < n_phases - 1:
                    busy_us = float(gemv.max() - pro.min())
                    stats.setdefault("gemv_gbs", []).append(gemv_bytes[ph] / 1e3 / busy_us)
            row = {k: float(torch.tensor(v).median()) for k, v in stats.items()}
            phases.append({"phase": names[ph], **row})
        totals = [float(t[:, -1, 3].max() - t[:, 0, 0].min()) for t in runs]
        return {"programs": p, "repeats": repeats, "total_us": float(torch.tensor(totals).median()),
                "phases": phases}

    def _use_tma(self, device: torch.device) -> bool:
        """Whether the TMA kernel runs on ``device``. Where it cannot (a GPU before sm_90, a Triton
        without Gluon, shapes it does not take) the Triton register-ring kernel computes the same
        function, and a compiled GPU says why once."""
        ok = self._tma_ok.get(device)
        if ok is None:
            why = (self._tma_unfit or self._tma_unfit_reason(self.n_programs(device))
                   or (None if _tma_on(device) else "it needs sm_90+ and Triton with Gluon"))
            if why and _compiled_on(device):
                log.warning("fused trunk: tma=True, but %s; %s runs the Triton register-ring kernel", why,
                            device)
            ok = self._tma_ok[device] = why is None
        return ok

    def _gluon_args(self, device: torch.device, p: int) -> dict:
        """TMA descriptors and copy lists of the Gluon kernel on ``device`` (built once)."""
        cached = self._gluon_cache.get(device)
        if cached is None:
            from triton.experimental.gluon import language as gl
            from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

            bn, tw = self.config.block_n, tma_width(self.config.block_n)
            layout = gl.NVMMASharedLayout(swizzle_byte_width=0, element_bitwidth=32, rank=2)
            table, counts = tma_copy_list(self._meta_rows, p, self.group_size, bn)
            w_rows = self.group_size // 8 * bn // tw
            cached = self._gluon_cache[device] = {
                "w_desc": TensorDescriptor.from_tensor(self.words.view(-1, tw), [w_rows, tw], layout),
                "s_desc": TensorDescriptor.from_tensor(self.scales.view(-1, tw), [bn // tw, tw], layout),
                "stream": table.to(device), "n_stream": counts.to(device), "stride": table.shape[1]}
        return cached

    def _run_gluon(self, x1: torch.Tensor, out: torch.Tensor, s: dict, p: int, consts: dict,
                   trace: torch.Tensor | None, device: torch.device) -> None:
        """One launch of the TMA-streamed Gluon kernel (:mod:`daptq_ros.gpu._gluon_fused`)."""
        from daptq_ros.gpu import _gluon_fused as gf

        g = self._gluon_args(device, p)
        keep = ("D", "FFN", "GROUP", "BLOCK_N", "BLOCK_PD", "BLOCK_PF", "BLOCK_S", "SLICE", "HAS_BIAS",
                "MAX_SPIN", "TRACE", "THREADS", "num_warps")
        gconsts = {k: consts[k] for k in keep}
        gconsts.update(STREAM_STRIDE=g["stride"], STAGES=self.config.stages,
                       TMA_W=tma_width(self.config.block_n), WS=self.config.ws, ONE_RT=self.config.one_rt,
                       AHEAD=self.config.ahead, EVICT="evict_last" if self.config.keep_l2 else "",
                       GATE=self.config.active_gate, GATE_LATE=self.config.gate_late,
                       num_stages=1)
        if self.config.ws:  # the producer's warpgroup gives its registers to the compute warps
            gconsts["maxnreg"] = 65536 // (32 * (self.config.num_warps + _PRODUCER_WARPS)) // 8 * 8
        args = (x1, out, g["w_desc"], g["s_desc"], self.vecs, self.meta, g["stream"], g["n_stream"], s["res"],
                s["qkv"], s["f"], s["bar"], s["err"], s["bar"] if trace is None else trace, self.n_layers,
                self.eps)
        self._check_residency(gf.gluon_trunk_kernel, device, args, p, gconsts)
        gf.gluon_trunk_kernel[(p,)](*args, **gconsts)

    def _reset(self, device: torch.device) -> None:
        for t in self._scratch_for(device).values():
            t.zero_()

    def _check_residency(self, jit_fn, device: torch.device, args: tuple, p: int, consts: dict) -> None:
        """Refuse a persistent launch whose programs could not all be resident at once (a grid
        barrier would then wait for programs that never start)."""
        key = (device, jit_fn.__name__)
        if key in self._checked_residency:
            return
        kernel = jit_fn.warmup(*args, grid=(p,), **consts)
        if hasattr(kernel, "_init_handles"):
            kernel._init_handles()  # loads the cubin: n_regs is known from here on
        props = torch.cuda.get_device_properties(device)
        threads = 32 * (consts["num_warps"] + (_PRODUCER_WARPS if consts.get("WS") else 0))
        regs = int(getattr(kernel, "n_regs", 0) or 255)  # unknown: assume the worst
        per_sm = min(65536 // (math.ceil(regs / 8) * 8 * threads), 2048 // threads)
        smem = int(kernel.metadata.shared) if hasattr(kernel, "metadata") else 0
        smem_sm = getattr(props, "shared_memory_per_multiprocessor", 0)
        if smem and smem_sm:
            per_sm = min(per_sm, smem_sm // smem)
        log.info("fused trunk kernel: %d registers/thread, %d B shared, %d program(s)/SM fit, %d launched",
                 regs, smem, per_sm, p)
        if per_sm * props.multi_processor_count < p:
            raise RuntimeError(f"fused trunk: {p} programs cannot all be resident ({per_sm}/SM × "
                               f"{props.multi_processor_count} SMs at {regs} registers/thread); "
                               "use programs_per_sm=1 or fewer warps")
        self._checked_residency.add(key)


# What fuse_trunk times on a GPU when no config is given (the default first): the ninth run's
# gated TMA ring with its producer warp (docs/gpu_bench.md), its gate opened at the barrier
# instead, the ring without the producer warp, and the seventh run's register-ring Triton kernel.
TUNE_CANDIDATES = (FusedConfig(), FusedConfig(gate_late=False), FusedConfig(ws=False), FusedConfig(tma=False))
_TUNE_REL_ERR_MAX = 2e-2


@torch.no_grad()
def fuse_trunk(model: nn.Module, config: FusedConfig | None = None,
               candidates: tuple[FusedConfig, ...] = TUNE_CANDIDATES, replays: int = 50) -> FusedTrunk:
    """:class:`FusedTrunk` of an f16x2-quantized trunk (see :func:`daptq_ros.gpu.linear.quantize_model`).

    Without ``config``, on a GPU running compiled Triton, each candidate is checked against the
    per-Linear model on a random token (relative error ≤ 2e-2, else skipped) and timed as CUDA-graph
    replays; the fastest is returned, with every timing in its ``tuning`` attribute. Elsewhere (the
    CPU interpreter) the default config is used.
    """
    if config is not None or not isinstance(model, Trunk) or not _compiled_on(model.norm.weight.device):
        return FusedTrunk(model, config)  # (refuses a model that is not a quantized Trunk)
    device = model.norm.weight.device

    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(1, 1, model.cfg.d_model, device=device, generator=gen).to(torch.bfloat16)
    ref = model(x).float()
    best: tuple[float, FusedTrunk] | None = None
    records = []
    for cand in candidates:
        rec: dict = {"config": cand.__dict__.copy()}
        try:
            fused = FusedTrunk(model, cand)
            rec["rel_err"] = relative_error(fused(x).float(), ref)
            if rec["rel_err"] > _TUNE_REL_ERR_MAX:
                rec["rejected"] = "error"
            else:
                rec["ms"] = timing.time_graphs(fused, [x], device, replays=replays, warmup=5)["median_ms"]
                if best is None or rec["ms"] < best[0]:
                    best = (rec["ms"], fused)
        except Exception as exc:  # a candidate that does not fit (registers, residency) is skipped
            rec["rejected"] = f"{type(exc).__name__}: {str(exc)[:200]}"
        records.append(rec)
        log.info("fused trunk candidate %s: %s", cand, rec)
    if best is None:
        raise RuntimeError(f"no fused trunk config passed its check: {records}")
    best[1].tuning = records
    return best[1]
