"""Python entry points of the small-M quantized matmul kernels, with a bounded autotuner.

Public functions (``x`` is (..., K) bfloat16; the result has x's leading shape and dtype):

- :func:`w8a16_linear` — int8 per-channel weight-only (Triton).
- :func:`w4a16_linear` — int4 group-wise weight-only (Triton).
- :func:`w4a16_f16x2_linear` — int4 group-wise weight-only, K-major words, packed fp16x2 GEMV
  (Triton with inline PTX; M ≤ :data:`GEMV_MAX_M`).
- :func:`w8a8_linear` — int8 weights *and* dynamic per-token int8 activations through
  ``torch._int_mm`` (cuBLASLt), with Triton kernels for the activation quantization and the
  scale epilogue (pure-torch fallback when Triton is unavailable).

Triton is imported lazily, so ``import daptq_ros.gpu`` works without it; under
``TRITON_INTERPRET=1`` the kernels run on the CPU (tests). The tuner (:class:`Autotuner`) picks a
:class:`KernelConfig` per (kernel, M bucket, N, K, group): each candidate is compiled, checked
against a float32 reference on random inputs (a wrong config is rejected and logged, never
timed) and timed with ``triton.testing.do_bench`` (L2 flushed between runs). A global time budget
bounds the whole tuning; once spent, new shapes take the first valid candidate.
"""

from __future__ import annotations

import importlib
import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from types import ModuleType

import torch

from daptq_ros.gpu.packing import (
    Int4KMajorWeight,
    Int4Weight,
    Int8Weight,
    quantize_rows_int8,
    reference_linear,
    relative_error,
)

log = logging.getLogger(__name__)

# A config whose output differs from the float32 reference by more than this is rejected:
# bf16 output rounding alone is ~2e-3 (METHOD.md: bf16 operands land between 1e-3 and 1e-2).
TUNE_REL_ERR_MAX = 1e-2
# Layers smaller than this take the first valid config untimed: they are launch-bound (the
# reference policy's 192-wide Linears) and tuning them would only spend the compile budget.
TUNE_MIN_BYTES = 1 << 20
# torch._int_mm (cuBLASLt) needs more than 16 rows; we pad M up to a multiple of 8, at least 32.
_INT_MM_MIN_M = 32


def triton_available() -> bool:
    """True when Triton imports and can run here (a CUDA device, or ``TRITON_INTERPRET=1``)."""
    try:
        importlib.import_module("triton")
    except Exception:
        return False
    return torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"


def _tk() -> ModuleType:
    """The Triton kernel module (imports triton on first use)."""
    return importlib.import_module("daptq_ros.gpu._triton_kernels")


@dataclass(frozen=True)
class KernelConfig:
    """Launch parameters of one weight-only matmul.

    Attributes:
        block_m / block_n / block_k: tile sizes (tokens, output features, input features).
        split_k: K splits (> 1 adds an fp32 workspace).
        swap_ab: compute the transposed tile (weights as the MMA's M dimension).
        mode: dequantization (0 int→fp16, 1 fp16 magic number, 2 int→bf16; see ``_triton_kernels``).
        num_warps / num_stages: Triton launch options.
        serial: with split-K, the last split of each tile reduces inside the same launch
            (otherwise a second, reduction launch does).
        gemv: the CUDA-core GEMV kernels (``w*a16_gemv_kernel``, no ``tl.dot``; for M ≤ 8);
            ``swap_ab`` is then unused, and so is ``mode`` except for the fp16x2 GEMV (1 = inline
            PTX fp16x2 math, 0 = the same sum in fp32 Triton ops, which the interpreter can run);
            there ``num_stages`` 2 means the kernel's own register double-buffering of K-blocks.
    """

    block_m: int = 16
    block_n: int = 64
    block_k: int = 128
    split_k: int = 1
    swap_ab: bool = True
    mode: int = 1
    num_warps: int = 4
    num_stages: int = 4
    serial: bool = True
    gemv: bool = False

    def short(self) -> str:
        """Compact string for logs and JSON (``g…``: the GEMV kernel)."""
        red = ("r" if self.serial else "R") if self.split_k > 1 else ""
        if self.gemv:
            return (f"g{self.block_m}n{self.block_n}k{self.block_k}s{self.split_k}{red}"
                    f"w{self.num_warps}p{self.num_stages}{'' if self.mode == 1 else f'd{self.mode}'}")
        return (f"m{self.block_m}n{self.block_n}k{self.block_k}s{self.split_k}{red}"
                f"{'T' if self.swap_ab else 'N'}d{self.mode}w{self.num_warps}p{self.num_stages}")


def m_bucket(m: int) -> int:
    """Tuning bucket of a token count: 16, 32, 64, 128 or 256 (the next power of two, at least 16)."""
    if m < 1:
        raise ValueError(f"M must be >= 1, got {m}")
    return min(256, max(16, 1 << (m - 1).bit_length()))


def tune_bucket(m: int) -> int:
    """Tuning-cache bucket: 1, 2, 4, 8 for the GEMV range, else :func:`m_bucket`.

    M = 1 must not share a config with M = 16 (a GEMV and a tensor-core tile differ ~10×).
    """
    if m < 1:
        raise ValueError(f"M must be >= 1, got {m}")
    return 1 << (m - 1).bit_length() if m <= GEMV_MAX_M else m_bucket(m)


# Largest token count the GEMV kernels are tried for (their FMA work grows with M).
GEMV_MAX_M = 8


def _doubled_split(may_double: Callable[[int], bool]) -> int:
    """The power-of-two split-K reached by doubling from 1 while ``may_double(split)`` holds."""
    split = 1
    while may_double(split):
        split *= 2
    return split


def gemv_split_k(n: int, block_n: int, k_blocks: int, m_programs: int, sm_count: int) -> int:
    """Power-of-two split-K bringing the GEMV grid to at least ~4 programs per SM (small programs:
    their loads in flight are what hides the HBM latency), never more splits than K-blocks."""
    tiles = math.ceil(n / block_n) * m_programs
    return _doubled_split(lambda split: tiles * split < 4 * sm_count and split * 2 <= k_blocks)


def gemv_configs(kind: str, m: int, n: int, k: int, group: int = 0, sm_count: int = 132,
                 quick: bool = False) -> list[KernelConfig]:
    """GEMV candidates for M ≤ :data:`GEMV_MAX_M` (empty beyond, or when K does not fit).

    Tiles (BLOCK_N × BLOCK_K) of 64×G, 128×G, 32×G (int4: BLOCK_K = the group, or half of it;
    int8: 128 / 256), each with its split-K heuristic and ×2 / ÷2 of it; BLOCK_M = 1 (one
    program per token) and, for M > 1, BLOCK_M = M's bucket (the rows share the dequantized tile).
    For M = 1 also deeper K-blocks (int4: 2 and 4 groups per block; int8: 512): at batch 1 a
    layer's time follows its number of programs × iterations more than its bytes, so moving more
    bytes per iteration is the int4 kernel's way to use its smaller weights.
    """
    if m > GEMV_MAX_M:
        return []
    if kind == "w4a16":
        bks = [bk for bk in (group, group // 2) if bk >= 32 and group % bk == 0 and k % bk == 0]
    else:
        bks = [bk for bk in (128, 256, 64) if k % bk == 0][:2]
    if not bks:
        return []
    bucket = tune_bucket(m)
    bms = [1] if bucket == 1 else [bucket, 1]
    tiles = [(64, bks[0]), (128, bks[0]), (32, bks[0])]
    if len(bks) > 1:
        tiles.append((64, bks[1]))
    if bms == [1]:
        deep = ([(64, 2 * group), (128, 2 * group), (64, 4 * group)] if kind == "w4a16"
                else [(64, 512), (128, 512)])
        tiles += [(bn, bk) for bn, bk in deep if k % bk == 0 and bk not in bks]
    if quick:
        tiles = tiles[:1]
    out: list[KernelConfig] = []
    for bm in bms:
        for bn, bk in (tiles if bm == bms[0] else tiles[:1]):
            elems = bm * bn * bk
            warps = 8 if elems >= 2 * 128 * 256 else 4
            kb = k // bk
            split = gemv_split_k(n, bn, kb, math.ceil(m / bm), sm_count)
            splits = [split] if quick else [split, split * 2, max(1, split // 2)]
            for sk in dict.fromkeys(splits):
                if sk > kb:
                    continue
                out.append(KernelConfig(bm, bn, bk, sk, False, 1, warps, 3, serial=True, gemv=True))
            if not quick and bm == bms[0] and (bn, bk) == tiles[0] and split > 1:
                out.append(KernelConfig(bm, bn, bk, split, False, 1, warps, 3, serial=False, gemv=True))
    return out


# fp16x2 GEMV tiles (BLOCK_N, warps, BLOCK_K as a fraction of the group): BLOCK_N ≥ 128 · warps,
# so a column's K-words stay in one thread (register-only K reduction). Measured on the H200 at
# batch 1 (docs/gpu_bench.md): register double-buffering (num_stages 2) won on every d-4096 shape,
# with half- or whole-group K-blocks and ~4 programs per SM; the single-buffered quarter-group
# tiles (40 registers, 48 warps per SM) stay as candidates.
_F16X2_PREFETCH_TILES = ((256, 2, 2), (256, 2, 1), (128, 1, 2), (512, 2, 2), (512, 4, 2), (256, 2, 4))
_F16X2_PLAIN_TILES = ((256, 2, 4), (128, 1, 4))


def f16x2_gemv_configs(m: int, n: int, k: int, group: int, sm_count: int = 132, quick: bool = False,
                       asm: bool = True) -> list[KernelConfig]:
    """Candidates of the fp16x2 GEMV (``w4a16_f16x2``; empty for M > :data:`GEMV_MAX_M`).

    Each tile with the split-K that gives ≥ 4 programs per SM, half and twice that.
    ``asm`` False gives the fp32-Triton-ops form of the same kernel (``mode`` 0): the interpreter's
    and the fallback when the inline PTX does not compile.
    """
    if m > GEMV_MAX_M:
        return []
    out: list[KernelConfig] = []
    families = [(t, 2) for t in _F16X2_PREFETCH_TILES] + [(t, 3) for t in _F16X2_PLAIN_TILES]
    for (bn, warps, div), stages in (families[:1] if quick else families):
        bk = group // div
        if bk < 8 or bk % 8 or group % bk or k % bk:
            continue
        kb = k // bk
        split = gemv_split_k(n, bn, kb, m, sm_count)
        splits = [split] if quick else [split, max(1, split // 2), split * 2]
        for sk in dict.fromkeys(splits):
            if sk <= kb:
                out.append(KernelConfig(1, bn, bk, sk, False, 1 if asm else 0, warps, stages, serial=True,
                                        gemv=True))
    return out


def default_split_k(m: int, n: int, k_blocks: int, block_m: int, block_n: int, sm_count: int) -> int:
    """Power-of-two split-K that brings the grid to about two programs per SM.

    Each split keeps at least two K-blocks so the software pipeline has something to overlap.
    """
    tiles = math.ceil(n / block_n) * math.ceil(m / block_m)
    return _doubled_split(lambda split: tiles * split * 2 <= 2 * sm_count and k_blocks // (split * 2) >= 2)


def candidate_configs(kind: str, m: int, n: int, k: int, group: int = 0, sm_count: int = 132,
                      quick: bool = False) -> list[KernelConfig]:
    """Configs the tuner tries for one shape; the first is the default when tuning is off.

    Args:
        kind: ``"w8a16"`` or ``"w4a16"``.
        m, n, k: tokens, output and input features.
        group: int4 group size (``BLOCK_K`` must divide it); ignored for w8a16.
        sm_count: multiprocessors (sets the split-K heuristic).
        quick: a smaller set (fewer compiles).
    """
    if kind == "w4a16_f16x2":
        return f16x2_gemv_configs(m, n, k, group, sm_count, quick, asm=_on_compiled_gpu())
    if kind not in ("w8a16", "w4a16"):
        raise ValueError(f"kind must be 'w8a16', 'w4a16' or 'w4a16_f16x2', got {kind!r}")
    if kind == "w4a16":
        block_ks = [bk for bk in (group, group // 2) if bk >= 32 and group % bk == 0]
    else:
        block_ks = [bk for bk in (128, 256, 64, 32) if k % bk == 0][:2]
    if not block_ks:
        raise ValueError(f"no BLOCK_K fits {kind} with K={k}, group={group}")
    bk_max, bk_min = block_ks[0], block_ks[-1]
    bn_big, bn_small = (128, 64) if n >= 1024 else (64, 128)
    bucket = m_bucket(m)
    bm = min(bucket, 64)
    # (BLOCK_M, BLOCK_N, BLOCK_K, SWAP_AB, MODE): the default first, then a few other tiles and the
    # conversion-based dequantization once. Every distinct tile is a compile (~1 s), so the set is
    # small and aimed at the memory-bound small-M buckets.
    base: list[tuple[int, int, int, bool, int]] = [(bm, bn_big, bk_max, True, 1)]
    if not quick:
        if bucket <= 64:
            base += [(bm, bn_small, bk_max, True, 1)]
        if bucket <= 32:
            base += [(bm, bn_big, bk_min, True, 1)]
        if bucket >= 128:
            base += [(128, bn_big, bk_max, True, 1), (bm, bn_big, bk_max, False, 1)]
    if bucket <= 64:
        base += [(bm, bn_big, bk_max, True, 0)]
    out: list[KernelConfig] = []
    for tile in dict.fromkeys(base):
        bm_, bn_, bk_, swap, mode = tile
        # 8 warps once the fp32 accumulator or the dequantized weight tile would not fit 4 warps'
        # registers (ptxas spilled at 64×128 and at 128×256 with 4 warps, sm_90)
        warps = 8 if bm_ * bn_ >= 64 * 128 or bn_ * bk_ >= 128 * 256 else 4
        stages = pipeline_stages(kind, bm_, bn_, bk_)
        split = default_split_k(m, n, k // bk_, bm_, bn_, sm_count)
        if quick:
            splits = [split]
        elif bucket <= 32:
            splits = [split, max(1, split // 2), split * 2]
        else:  # many tokens: the workspace traffic may outweigh the split
            splits = [split, 1] + ([split // 2] if split >= 4 else [])
        for sk in dict.fromkeys(splits):
            if sk > 1 and k // bk_ < 2 * sk:
                continue
            out.append(KernelConfig(bm_, bn_, bk_, sk, swap, mode, warps, stages))
            if sk == split > 1 and tile == base[0] and not quick:  # the two-launch reduction
                out.append(KernelConfig(bm_, bn_, bk_, sk, swap, mode, warps, stages, serial=False))
    if bucket == 16 and not quick:  # M = 9..16: deeper split and the 128-wide tile with 8 warps
        extra = [(bm, 128, bk_max, 8), (bm, 64, bk_max, 8)]
        for bm_, bn_, bk_, warps in extra:
            split = default_split_k(m, n, k // bk_, bm_, bn_, sm_count) * 2
            if k // bk_ >= 2 * split:
                out.append(KernelConfig(bm_, bn_, bk_, split, True, 1, warps,
                                        pipeline_stages(kind, bm_, bn_, bk_)))
    # M <= 8: the GEMV kernels first (the default when tuning is off), the tensor-core tiles after
    return list(dict.fromkeys([*gemv_configs(kind, m, n, k, group, sm_count, quick), *out]))


def fallback_configs(kind: str, m: int, n: int, k: int, group: int = 0,
                     sm_count: int = 132) -> list[KernelConfig]:
    """Configs tried only when every candidate failed: bf16 operands (mode 2, safe for activations
    beyond the fp16 range) and the plain two-launch split-K; for the fp16x2 GEMV its fp32 form."""
    if kind == "w4a16_f16x2":
        return f16x2_gemv_configs(m, n, k, group, sm_count, quick=True, asm=False)
    first = next(c for c in candidate_configs(kind, m, n, k, group, sm_count, quick=True) if not c.gemv)
    return [replace(first, mode=2), replace(first, mode=2, split_k=1), replace(first, serial=False)]


# Shared memory the software pipeline may use (H100: 227 KB per block; the rest is left for
# Triton's layout-conversion scratch).
_PIPELINE_SMEM = 160 * 1024


def pipeline_stages(kind: str, block_m: int, block_n: int, block_k: int) -> int:
    """Pipeline depth (2..4) whose weight + activation tiles fit :data:`_PIPELINE_SMEM`."""
    w_bytes = block_n * block_k // (2 if kind == "w4a16" else 1)
    stage = w_bytes + block_m * block_k * 2
    return max(2, min(4, _PIPELINE_SMEM // stage))


@dataclass
class TuneRecord:
    """What the tuner decided for one key (kept for the benchmark JSON)."""

    key: str
    config: KernelConfig
    time_us: float | None
    tried: int
    rejected: list[str] = field(default_factory=list)
    timings_us: dict[str, float] = field(default_factory=dict)  # every timed candidate

    def to_dict(self) -> dict:
        return {"key": self.key, "config": asdict(self.config), "config_str": self.config.short(),
                "time_us": self.time_us, "tried": self.tried, "rejected": self.rejected,
                "timings_us": self.timings_us}


class Autotuner:
    """Per-shape config choice with correctness gating and a global time budget.

    Args:
        budget_s: total seconds all tuning may take (compiles included); 0 disables tuning.
        quick: use the reduced candidate sets.
    """

    def __init__(self, budget_s: float = 150.0, quick: bool = False) -> None:
        self.budget_s = budget_s
        self.quick = quick
        self.spent_s = 0.0
        self.records: dict[str, TuneRecord] = {}

    def remaining_s(self) -> float:
        """Seconds of tuning budget left."""
        return max(0.0, self.budget_s - self.spent_s)

    def choose(self, key: str, candidates: list[KernelConfig], run: Callable[[KernelConfig], torch.Tensor],
               reference: Callable[[], torch.Tensor], fallbacks: list[KernelConfig] | None = None,
               tune: bool = True) -> KernelConfig:
        """Return the cached config for ``key`` or tune one.

        Args:
            key: cache key (kernel, M bucket, N, K, group).
            candidates: configs to try, default first.
            run: launches the kernel with a config on the tuning inputs and returns its output.
            reference: returns the float32-accurate expected output on the same inputs.
            fallbacks: configs tried (untimed) only when every candidate fails.
            tune: False takes the first valid candidate without timing (small layers).
        """
        if key in self.records:
            return self.records[key].config
        capturing = _capturing()
        on_gpu = _on_compiled_gpu()
        if capturing or not on_gpu or not tune or self.remaining_s() <= 0:
            why = ("capturing" if capturing else "no GPU" if not on_gpu else "small layer" if not tune
                   else "budget spent")
            return self._first_valid(key, [*candidates, *(fallbacks or [])], run, reference, why)
        t0 = time.perf_counter()
        ref = reference()
        best: tuple[float, KernelConfig] | None = None
        rejected: list[str] = []
        timings: dict[str, float] = {}
        tried = 0
        for cfg in candidates:
            if time.perf_counter() - t0 > self.remaining_s():
                log.warning("tuning budget spent during %s after %d configs", key, tried)
                break
            tried += 1
            try:
                err = relative_error(run(cfg), ref)
                if not err <= TUNE_REL_ERR_MAX:
                    rejected.append(f"{cfg.short()}: rel err {err:.2e}")
                    log.warning("%s: config %s rejected, rel err %.2e", key, cfg.short(), err)
                    continue
                t_ms = _bench_ms(lambda c=cfg: run(c))
            except Exception as exc:
                rejected.append(f"{cfg.short()}: {type(exc).__name__}: {str(exc)[:200]}")
                log.warning("%s: config %s failed: %s", key, cfg.short(), exc)
                continue
            timings[cfg.short()] = round(t_ms * 1e3, 2)
            if best is None or t_ms < best[0]:
                best = (t_ms, cfg)
        self.spent_s += time.perf_counter() - t0
        if best is None:
            log.warning("%s: no candidate valid, trying fallbacks: %s", key, rejected)
            cfg = self._first_valid(key, fallbacks or [], run, reference, "all candidates failed")
            self.records[key].rejected[:0] = rejected
            return cfg
        self.records[key] = TuneRecord(key, best[1], best[0] * 1e3, tried, rejected, timings)
        log.info("tuned %s -> %s (%.1f us, %d tried, %.0f s budget left)", key, best[1].short(),
                 best[0] * 1e3, tried, self.remaining_s())
        return best[1]

    def _first_valid(self, key: str, candidates: list[KernelConfig],
                     run: Callable[[KernelConfig], torch.Tensor], reference: Callable[[], torch.Tensor],
                     why: str) -> KernelConfig:
        if key in self.records:
            return self.records[key].config
        if _capturing():  # cannot check inside a graph capture: take the default untested
            return candidates[0]
        ref = reference()
        rejected: list[str] = []
        for cfg in candidates:
            try:
                err = relative_error(run(cfg), ref)
            except Exception as exc:
                rejected.append(f"{cfg.short()}: {type(exc).__name__}: {str(exc)[:200]}")
                continue
            if err <= TUNE_REL_ERR_MAX:
                self.records[key] = TuneRecord(key, cfg, None, len(rejected) + 1, rejected)
                log.info("%s: untuned (%s) -> %s", key, why, cfg.short())
                return cfg
            rejected.append(f"{cfg.short()}: rel err {err:.2e}")
        raise RuntimeError(f"no valid kernel config for {key}: {rejected}")


def _capturing() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def _on_compiled_gpu() -> bool:
    """A CUDA device running compiled Triton, not ``TRITON_INTERPRET=1``: tuning times configs
    only there, and only there can inline PTX run."""
    return torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1"


_FLUSH: dict[str, torch.Tensor] = {}
_BENCH_REPS = 25


def _bench_ms(fn: Callable[[], object]) -> float:
    """Median device time of ``fn`` in ms over a fixed number of runs, each timed alone with CUDA
    events after a 256 MB write that evicts the L2 (weights stream from HBM as in the model).

    ``fn`` is captured into a CUDA graph when it can be, so host launch overhead (our Python
    wrapper, two launches with the two-launch split-K) does not leak into the comparison.
    A fixed count (not ``do_bench``'s time-based one) keeps a 3 µs kernel from costing 2000 runs.
    """
    target: Callable[[], object] = fn
    fn()
    torch.cuda.synchronize()
    try:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        target = graph.replay
    except Exception as exc:  # fall back to eager launches
        log.debug("tuning without a graph: %s", exc)
    dev = str(torch.cuda.current_device())
    flush = _FLUSH.get(dev)
    if flush is None:
        flush = _FLUSH[dev] = torch.empty(64 * 2**20, dtype=torch.int32, device="cuda")
    for _ in range(3):
        target()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(_BENCH_REPS)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(_BENCH_REPS)]
    for s, e in zip(starts, ends, strict=True):
        flush.zero_()
        s.record()
        target()
        e.record()
    torch.cuda.synchronize()
    times = sorted(s.elapsed_time(e) for s, e in zip(starts, ends, strict=True))
    return times[len(times) // 2]


_TUNER = Autotuner()


def get_tuner() -> Autotuner:
    """The process-wide tuner used by the linear wrappers."""
    return _TUNER


def set_tuner(tuner: Autotuner) -> None:
    """Replace the process-wide tuner (e.g. with another budget)."""
    global _TUNER
    _TUNER = tuner


def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 132  # interpreter: the H100's count keeps the CPU configs like the GPU ones


def _check_x(x: torch.Tensor, k: int) -> torch.Tensor:
    if x.shape[-1] != k:
        raise ValueError(f"x has {x.shape[-1]} input features, weight expects {k}")
    x2 = x.reshape(-1, k)
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


def launch_weight_only(kind: str, x2: torch.Tensor, weight: Int8Weight | Int4Weight | Int4KMajorWeight,
                       bias: torch.Tensor | None, cfg: KernelConfig) -> torch.Tensor:
    """Run one weight-only matmul with an explicit config on 2-D ``x2`` (M, K); returns (M, N)."""
    tk = _tk()
    m, k = x2.shape
    n = weight.shape[0]
    if k % cfg.block_k:
        raise ValueError(f"K={k} is not a multiple of BLOCK_K={cfg.block_k}")
    k_blocks = k // cfg.block_k
    split = max(1, min(cfg.split_k, k_blocks))
    per_split = math.ceil(k_blocks / split)
    split = math.ceil(k_blocks / per_split)
    out = torch.empty((m, n), device=x2.device, dtype=x2.dtype)
    grid = (math.ceil(n / cfg.block_n), math.ceil(m / cfg.block_m), split)
    split_mode = 0 if split == 1 else (2 if cfg.serial else 1)
    ws = torch.empty((split, m, n), device=x2.device, dtype=torch.float32) if split > 1 else out
    counters = tile_counters(x2.device, grid[0] * grid[1]) if split_mode == 2 else out
    bias_arg = bias if bias is not None else out
    if kind == "w4a16_f16x2":
        _launch_f16x2_gemv(tk, x2, weight, bias, cfg, out, ws, counters, grid, split_mode, per_split)
        if split_mode == 1:
            _reduce(tk, ws, bias, out, m, n, split)
        return out
    if cfg.gemv:
        _launch_gemv(tk, kind, x2, weight, bias, cfg, out, ws, counters, grid, split_mode, per_split)
        if split_mode == 1:
            _reduce(tk, ws, bias, out, m, n, split)
        return out
    common = dict(BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, SWAP_AB=cfg.swap_ab,
                  MODE=cfg.mode, HAS_BIAS=bias is not None, SPLIT_MODE=split_mode,
                  EVEN_N=n % cfg.block_n == 0, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    if kind == "w4a16":
        if not isinstance(weight, Int4Weight):
            raise TypeError(f"w4a16 needs an Int4Weight, got {type(weight).__name__}")
        if weight.group_size % cfg.block_k:
            raise ValueError(f"BLOCK_K={cfg.block_k} must divide group_size={weight.group_size}")
        tk.w4a16_kernel[grid](x2, weight.packed, weight.scales, bias_arg, out, ws, counters,
                              m, n, k, x2.stride(0), weight.packed.stride(0), weight.scales.stride(0),
                              n, m * n, per_split, GROUP=weight.group_size, **common)
    else:
        if not isinstance(weight, Int8Weight):
            raise TypeError(f"w8a16 needs an Int8Weight, got {type(weight).__name__}")
        tk.w8a16_kernel[grid](x2, weight.q, weight.scales, bias_arg, out, ws, counters,
                              m, n, k, x2.stride(0), weight.q.stride(0), n, m * n, per_split, **common)
    if split_mode == 1:
        _reduce(tk, ws, bias, out, m, n, split)
    return out


def _reduce(tk: ModuleType, ws: torch.Tensor, bias: torch.Tensor | None, out: torch.Tensor, m: int, n: int,
            split: int) -> None:
    block = 1024
    tk.splitk_reduce_kernel[(math.ceil(m * n / block),)](ws, bias if bias is not None else out, out, m * n, n,
                                                         split, HAS_BIAS=bias is not None, BLOCK=block)


def _launch_gemv(tk: ModuleType, kind: str, x2: torch.Tensor, weight: Int8Weight | Int4Weight,
                 bias: torch.Tensor | None, cfg: KernelConfig, out: torch.Tensor, ws: torch.Tensor,
                 counters: torch.Tensor, grid: tuple[int, int, int], split_mode: int, per_split: int) -> None:
    """The GEMV kernels read the weights as int32 words: 8 int4 or 4 int8 per word."""
    m, k = x2.shape
    n = weight.shape[0]
    common = dict(BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
                  HAS_BIAS=bias is not None, SPLIT_MODE=split_mode, EVEN_N=n % cfg.block_n == 0,
                  num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    bias_arg = bias if bias is not None else out
    if kind == "w4a16":
        if not isinstance(weight, Int4Weight):
            raise TypeError(f"w4a16 needs an Int4Weight, got {type(weight).__name__}")
        g = weight.group_size
        if (g % cfg.block_k and cfg.block_k % g) or cfg.block_k % 8:
            raise ValueError(f"BLOCK_K={cfg.block_k} must divide group_size={g} or be a multiple of it, "
                             "and be a multiple of 8")
        words = weight.packed.view(torch.int32)
        tk.w4a16_gemv_kernel[grid](x2, words, weight.scales, bias_arg, out, ws, counters,
                                   m, n, k, x2.stride(0), words.stride(0), weight.scales.stride(0),
                                   n, m * n, per_split, GROUP=weight.group_size, **common)
    else:
        if not isinstance(weight, Int8Weight):
            raise TypeError(f"w8a16 needs an Int8Weight, got {type(weight).__name__}")
        if cfg.block_k % 4:
            raise ValueError(f"BLOCK_K={cfg.block_k} must be a multiple of 4")
        words = weight.q.view(torch.int32)
        tk.w8a16_gemv_kernel[grid](x2, words, weight.scales, bias_arg, out, ws, counters,
                                   m, n, k, x2.stride(0), words.stride(0), n, m * n, per_split, **common)


def _launch_f16x2_gemv(tk: ModuleType, x2: torch.Tensor, weight: Int4KMajorWeight, bias: torch.Tensor | None,
                       cfg: KernelConfig, out: torch.Tensor, ws: torch.Tensor, counters: torch.Tensor,
                       grid: tuple[int, int, int], split_mode: int, per_split: int) -> None:
    """The fp16x2 GEMV reads x as int32 pairs of bf16 and the K-major words of ``weight``."""
    if not isinstance(weight, Int4KMajorWeight):
        raise TypeError(f"w4a16_f16x2 needs an Int4KMajorWeight, got {type(weight).__name__}")
    m, k = x2.shape
    n = weight.shape[0]
    g = weight.group_size
    if not cfg.gemv or cfg.block_m != 1:
        raise ValueError(f"w4a16_f16x2 runs GEMV configs with BLOCK_M = 1, got {cfg.short()}")
    if g % cfg.block_k or cfg.block_k % 8:
        raise ValueError(f"BLOCK_K={cfg.block_k} must divide group_size={g} and be a multiple of 8")
    if x2.dtype != torch.bfloat16:
        raise TypeError(f"w4a16_f16x2 takes bfloat16 activations, got {x2.dtype}")
    xw = x2.view(torch.int32)  # (M, K/2) pairs; x2 rows are contiguous (``_check_x``)
    tk.w4a16_f16x2_gemv_kernel[grid](
        xw, weight.words, weight.scales, bias if bias is not None else out, out, ws, counters,
        m, n, k, xw.stride(0), weight.words.stride(0), weight.scales.stride(0), n, m * n, per_split,
        GROUP=g, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, HAS_BIAS=bias is not None,
        SPLIT_MODE=split_mode, EVEN_N=n % cfg.block_n == 0, USE_ASM=cfg.mode == 1,
        SPLIT=grid[2], PREFETCH=cfg.num_stages == 2, num_warps=cfg.num_warps, num_stages=cfg.num_stages)


# Per-device int32 tile counters of the in-launch split-K reduction. Every launch leaves them at 0
# (the last split of a tile resets its counter), so one zeroed buffer serves all layers. Buffers
# are never freed: captured CUDA graphs keep their addresses.
_COUNTERS: dict[str, list[torch.Tensor]] = {}
_COUNTERS_MIN = 1 << 16


def tile_counters(device: torch.device, n_tiles: int) -> torch.Tensor:
    """A zeroed int32 buffer of at least ``n_tiles`` entries on ``device`` (allocated eagerly)."""
    bufs = _COUNTERS.setdefault(str(device), [])
    if not bufs or bufs[-1].numel() < n_tiles:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise RuntimeError("split-K tile counters must be allocated before CUDA-graph capture")
        bufs.append(torch.zeros(max(n_tiles, _COUNTERS_MIN), dtype=torch.int32, device=device))
    return bufs[-1]


def _weight_only(kind: str, x: torch.Tensor, weight: Int8Weight | Int4Weight | Int4KMajorWeight,
                 bias: torch.Tensor | None, config: KernelConfig | None) -> torch.Tensor:
    n, k = weight.shape
    x2 = _check_x(x, k)
    m = x2.shape[0]
    if config is None:
        tuner = get_tuner()
        group = weight.group_size if isinstance(weight, (Int4Weight, Int4KMajorWeight)) else 0
        key = f"{kind}|M{tune_bucket(m)}|N{n}|K{k}|G{group}"
        record = tuner.records.get(key)
        if record is not None:
            config = record.config
        else:
            sms = _sm_count(x2.device)
            config = tuner.choose(
                key, candidate_configs(kind, m, n, k, group, sms, tuner.quick),
                run=lambda c: launch_weight_only(kind, x2, weight, bias, c),
                reference=lambda: reference_linear(x2, weight.dequantize(torch.float32), bias, torch.float32),
                fallbacks=fallback_configs(kind, m, n, k, group, sms),
                tune=weight.nbytes >= TUNE_MIN_BYTES,
            )
    out = launch_weight_only(kind, x2, weight, bias, config)
    return out.reshape(*x.shape[:-1], n)


def w8a16_linear(x: torch.Tensor, qweight: Int8Weight, bias: torch.Tensor | None = None,
                 config: KernelConfig | None = None) -> torch.Tensor:
    """``x @ (q * scales).T + bias`` with int8 per-channel weights, bf16 activations, fp32 accumulation.

    Args:
        x: activations (..., K), bf16 (fp16 also works).
        qweight: :class:`Int8Weight` on x's device.
        bias: optional (N,).
        config: explicit launch config; ``None`` asks the tuner.
    """
    return _weight_only("w8a16", x, qweight, bias, config)


def w4a16_linear(x: torch.Tensor, packed: Int4Weight, bias: torch.Tensor | None = None,
                 config: KernelConfig | None = None) -> torch.Tensor:
    """``x @ dequant(packed).T + bias`` with group-wise int4 weights, bf16 activations, fp32 accumulation.

    Args:
        x: activations (..., K), bf16.
        packed: :class:`Int4Weight` (its ``group_size`` sets the scale groups) on x's device.
        bias: optional (N,).
        config: explicit launch config; ``None`` asks the tuner.
    """
    return _weight_only("w4a16", x, packed, bias, config)


def w4a16_f16x2_linear(x: torch.Tensor, weight: Int4KMajorWeight, bias: torch.Tensor | None = None,
                       config: KernelConfig | None = None) -> torch.Tensor:
    """``x @ dequant(weight).T + bias`` for up to :data:`GEMV_MAX_M` tokens through the fp16x2 GEMV.

    Args:
        x: activations (..., K), bf16, at most :data:`GEMV_MAX_M` rows.
        weight: :class:`Int4KMajorWeight` on x's device.
        bias: optional (N,).
        config: explicit launch config; ``None`` asks the tuner.
    """
    rows = x.numel() // max(1, x.shape[-1])
    if rows > GEMV_MAX_M:
        raise ValueError(f"w4a16_f16x2_linear takes at most {GEMV_MAX_M} rows, got {rows}")
    return _weight_only("w4a16_f16x2", x, weight, bias, config)


def prepare_int_mm_weight(weight: Int8Weight) -> torch.Tensor:
    """The (K, N) column-major view ``torch._int_mm`` wants (row-major was 5× slower on the H100)."""
    return weight.q.contiguous().t()


def w8a8_linear(x: torch.Tensor, weight: Int8Weight, w_t: torch.Tensor, bias: torch.Tensor | None = None,
                use_triton: bool = True) -> torch.Tensor:
    """int8 × int8 → int32 matmul (``torch._int_mm``) with dynamic per-token activation scales.

    Args:
        x: activations (..., K), bf16.
        weight: :class:`Int8Weight` (its per-channel scales are used in the epilogue).
        w_t: :func:`prepare_int_mm_weight` of ``weight``.
        bias: optional (N,).
        use_triton: fuse the activation quantization and the epilogue into Triton kernels.
    """
    n, k = weight.shape
    x2 = _check_x(x, k)
    m = x2.shape[0]
    mp = max(_INT_MM_MIN_M, (m + 7) // 8 * 8)
    if use_triton:
        tk = _tk()
        xq = torch.empty((mp, k), device=x2.device, dtype=torch.int8)
        sx = torch.empty((mp,), device=x2.device, dtype=torch.float32)
        block_k = triton_next_pow2(k)
        tk.rowquant_int8_kernel[(mp,)](x2, xq, sx, m, k, x2.stride(0), BLOCK_K=block_k,
                                       num_warps=8 if block_k >= 4096 else 4)
        acc = torch._int_mm(xq, w_t)
        out = torch.empty((m, n), device=x2.device, dtype=x2.dtype)
        grid = (math.ceil(n / 64), math.ceil(m / 32))
        tk.intmm_epilogue_kernel[grid](acc, sx, weight.scales, bias if bias is not None else out, out, m, n,
                                       HAS_BIAS=bias is not None, BLOCK_M=32, BLOCK_N=64)
    else:
        xq, sx2 = quantize_rows_int8(x2)
        if mp > m:
            xq = torch.cat([xq, xq.new_zeros(mp - m, k)])
        acc = torch._int_mm(xq, w_t)[:m]
        out = acc.to(torch.float32) * sx2 * weight.scales[None, :]
        if bias is not None:
            out = out + bias.to(torch.float32)
        out = out.to(x2.dtype)
    return out.reshape(*x.shape[:-1], n)


def triton_next_pow2(n: int) -> int:
    """Smallest power of two ≥ n (``triton.next_power_of_2`` without importing triton)."""
    return 1 << max(0, (n - 1).bit_length())
