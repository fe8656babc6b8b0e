"""The fused batch-1 trunk kernel: a whole pre-LN transformer forward for one token in one launch.

Imported only where Triton is available (``daptq_ros.gpu.fused`` launches it). Four phases per
layer, each a GEMV whose input every program first builds itself, from the whole row, in its own
slice of ``act`` (packed fp16x2 words; the row is 4-11 K elements, a few per thread):

====  =========================================  ================================================
ph    prologue (every program, whole row)        GEMV (this program's share of the cells)
====  =========================================  ================================================
0     LayerNorm of the residual (layer 0: of the  W_qkv → fp32 atomics into ``qkv``; zeroes its
      bf16 input, which it also copies to the     share of the MLP accumulator ``f``
      fp32 residual, its share)
1     v = ``qkv[2d:3d]`` (one token: softmax      W_o → atomics into the residual (the atomics
      over one key is 1, attention returns v;     are the residual add)
      q and k are still computed)
2     LayerNorm of the residual                   W_fc1 → atomics into ``f``; zeroes its share of
                                                  ``qkv`` for the next layer
3     tanh-GELU of ``f``                          W_fc2 → atomics into the residual
====  =========================================  ================================================

and a last phase applies the final LayerNorm → bf16 output. Phases are separated by a grid-wide
barrier (an arrive counter, polled with ``ld.acquire``), so the grid must be co-resident: one or
two programs per SM, checked by the host. A launch runs phases [``phase_begin``, ``phase_end``):
the whole forward as one persistent launch on the GPU, or one launch per phase — no barrier — in
the CPU interpreter (which runs programs one after another) and for the per-phase ablation.

Work split: each GEMV's weights are stored tile-major — cell (tile t, group g) is the
[GROUP/8, BLOCK_N] block of K-major int4 words of rows t·BLOCK_N.. and K-group g, contiguous,
and cells of one tile follow each other — and program p takes cells [p·C/P, (p+1)·C/P): equal
bytes per program to within one cell, one contiguous range of memory. A partial tile's sum goes
out with one fp32 atomic per row when the tile (or the range) ends; the order of the atomics
makes the sum nondeterministic in its last bits.

Streaming: cell loads go through a register ring of two cells, unrolled so that no slot is
copied; the first two cells' weights and scales of the next GEMV are loaded before the barrier,
so their DRAM latency overlaps the barrier and the prologue. Scales are stored as pair words (two
groups' bf16 scales per int32) and loaded in the weights' own register layout. Each prologue
loads the whole row at once (one L2 round trip, not one per chunk).
"""

from __future__ import annotations

import triton
import triton.language as tl

from daptq_ros.gpu._triton_kernels import Q4_DEQUANT_CONSTS_PTX, _q4x8_dot_words, q4_dequant_word_ptx


def _q4x32_dot_asm() -> str:
    """PTX of Σ q·x/16 over four K-major int4 words (32 weights) and their 16 fp16x2 activation
    words: each word dequantized as in the per-Linear GEMV (:func:`~daptq_ros.gpu._triton_kernels.
    q4_dequant_word_ptx`), the products accumulated in two fp16x2 registers (words 0-1, 2-3), one
    fp32 result."""
    lines = ["{", ".reg .b32 a, b, c, d, v, k16, kb16, k256, kb256, s0, s1;", ".reg .b16 lo, hi;",
             ".reg .f32 flo, fhi;", *Q4_DEQUANT_CONSTS_PTX]
    for i in range(4):
        acc = f"s{i // 2}"
        x = [f"${5 + 4 * i + j}" for j in range(4)]
        lines += q4_dequant_word_ptx(f"${1 + i}")
        lines += [(f"mul.rn.f16x2 {acc}, a, {x[0]};" if i % 2 == 0
                   else f"fma.rn.f16x2 {acc}, a, {x[0]}, {acc};"),
                  f"fma.rn.f16x2 {acc}, b, {x[1]}, {acc};", f"fma.rn.f16x2 {acc}, c, {x[2]}, {acc};",
                  f"fma.rn.f16x2 {acc}, d, {x[3]}, {acc};"]
    lines += ["add.rn.f16x2 s0, s0, s1;", "mov.b32 {lo, hi}, s0;", "cvt.f32.f16 flo, lo;",
              "cvt.f32.f16 fhi, hi;", "add.f32 $0, flo, fhi;", "}"]
    return "\n".join(lines)


_Q4X32_DOT_ASM = tl.constexpr(_q4x32_dot_asm())

# Fields of one GEMV's row of the int64 meta table (host: daptq_ros.gpu.fused._META_FIELDS).
META_W, META_S, META_BIAS = tl.constexpr(0), tl.constexpr(1), tl.constexpr(2)
META_TILES, META_GROUPS, META_N = tl.constexpr(3), tl.constexpr(4), tl.constexpr(5)
META_STRIDE = tl.constexpr(8)
# The vector table (fp32): per layer ln1 γ, β, ln2 γ, β (d each), then the final γ, β.
# ld.acquire.gpu of [$1] by the thread whose $2 is 0 (the others return 0).
LOAD_ACQUIRE_BY_THREAD0_ASM = tl.constexpr("{\n.reg .pred p;\nsetp.eq.s32 p, $2, 0;\nmov.u32 $0, 0;\n"
                                           "@p ld.acquire.gpu.global.b32 $0, [$1];\n}")


@triton.jit
def _pack_f16x2(even, odd):
    """fp32 (even, odd) → int32 words of two fp16, even in the low half (``cvt.rn.f16x2`` order)."""
    lo = even.to(tl.float16).to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
    hi = odd.to(tl.float16).to(tl.int16, bitcast=True).to(tl.int32)
    return lo | (hi << 16)


@triton.jit
def _cell_range(meta_ptr, j, pid, n_prog, EVICT: tl.constexpr):
    """GEMV ``j``'s cell count per tile, and this program's cell range [c0, c1) (the table's loads
    with L2 eviction policy ``EVICT``)."""
    row = meta_ptr + j * META_STRIDE
    n_groups = tl.load(row + META_GROUPS, eviction_policy=EVICT).to(tl.int32)
    n_cells = tl.load(row + META_TILES, eviction_policy=EVICT).to(tl.int32) * n_groups
    return n_groups, pid * n_cells // n_prog, (pid + 1) * n_cells // n_prog


@triton.jit
def _l2_prefetch(ptrs, nbytes, active):
    """``cp.async.bulk.prefetch.L2`` of ``nbytes`` (a multiple of 16) at each 16-byte-aligned
    pointer whose ``active`` flag is set (one element per thread: no replicated requests)."""
    return tl.inline_asm_elementwise(
        "{\n.reg .pred p;\nsetp.ne.b32 p, $3, 0;\n"
        "@p cp.async.bulk.prefetch.L2.global [$1], $2;\nmov.u32 $0, 0;\n}",
        "=r,l,r,r", [ptrs, nbytes, active], dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def _prefetch(base, nbytes, ok, THREADS: tl.constexpr):
    """One bulk L2 prefetch of ``nbytes`` at ``base`` (issued by thread 0, if ``ok``)."""
    idx = tl.arange(0, THREADS)
    _l2_prefetch(base.to(tl.pointer_type(tl.int8)) + 0 * idx, tl.maximum(nbytes, 16) + 0 * idx,
                 ((idx == 0) & ok).to(tl.int32))


@triton.jit
def _scale_loads(s_base, g, t, n_groups, offs_r, offs_n, BLOCK_N: tl.constexpr):
    """The scale pair words of cell (tile ``t``, group ``g``) — groups 2i, 2i + 1 of each row, see
    ``fused.pair_scales`` — as a [rows, BLOCK_N] block whose rows all read the same words: it takes
    the weight blocks' register layout, so using it needs no layout change (no shared-memory
    round trip)."""
    pair = t * ((n_groups + 1) // 2) + g // 2
    return tl.load(s_base + pair * BLOCK_N + 0 * offs_r[:, None] + offs_n[None, :])


@triton.jit
def _scale_of(words, g):
    """fp32 scales of a cell of group ``g`` from its pair words (bf16 in the low half for even ``g``)."""
    bits = tl.where((g % 2) == 0, words << 16, words & -65536)
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _weight_loads(src, c, g, t, GW: tl.constexpr, BLOCK_N: tl.constexpr, QUAD: tl.constexpr):
    """Cell ``c`` (tile ``t``, group ``g``): its int4 words — one [GW, BLOCK_N] block, or with
    ``QUAD`` four [GW/4, BLOCK_N] blocks (K-words i·GW/4 + r) — and its scale pair words.
    ``src`` = (weights, scales, activations, groups per tile, row offsets, column offsets)."""
    w_base, s_base, _, n_groups, offs_r, offs_n = src
    w = w_base + c * (GW * BLOCK_N) + offs_r[:, None] * BLOCK_N + offs_n[None, :]
    sw = _scale_loads(s_base, g, t, n_groups, offs_r, offs_n, BLOCK_N)
    if QUAD:
        Q: tl.constexpr = GW // 4
        return (tl.load(w, eviction_policy="evict_first"),
                tl.load(w + Q * BLOCK_N, eviction_policy="evict_first"),
                tl.load(w + 2 * Q * BLOCK_N, eviction_policy="evict_first"),
                tl.load(w + 3 * Q * BLOCK_N, eviction_policy="evict_first"), sw)
    else:
        return tl.load(w, eviction_policy="evict_first"), sw


@triton.jit
def _act_loads(src, g, GW: tl.constexpr, QUAD: tl.constexpr):
    """The packed activation-pair words of group ``g`` each thread's K-words need: 4 per K-word
    row (one block), or 16 (``QUAD``: 4 rows i·GW/4 + r, block-major)."""
    _, _, act_ptr, _, offs_r, _ = src
    xp = act_ptr + (g * GW + offs_r) * 4
    if QUAD:
        Q: tl.constexpr = GW // 4
        return (tl.load(xp, cache_modifier=".cg"), tl.load(xp + 1, cache_modifier=".cg"),
                tl.load(xp + 2, cache_modifier=".cg"), tl.load(xp + 3, cache_modifier=".cg"),
                tl.load(xp + 4 * Q, cache_modifier=".cg"), tl.load(xp + 4 * Q + 1, cache_modifier=".cg"),
                tl.load(xp + 4 * Q + 2, cache_modifier=".cg"), tl.load(xp + 4 * Q + 3, cache_modifier=".cg"),
                tl.load(xp + 8 * Q, cache_modifier=".cg"), tl.load(xp + 8 * Q + 1, cache_modifier=".cg"),
                tl.load(xp + 8 * Q + 2, cache_modifier=".cg"), tl.load(xp + 8 * Q + 3, cache_modifier=".cg"),
                tl.load(xp + 12 * Q, cache_modifier=".cg"), tl.load(xp + 12 * Q + 1, cache_modifier=".cg"),
                tl.load(xp + 12 * Q + 2, cache_modifier=".cg"),
                tl.load(xp + 12 * Q + 3, cache_modifier=".cg"))
    else:
        return (tl.load(xp, cache_modifier=".cg"), tl.load(xp + 1, cache_modifier=".cg"),
                tl.load(xp + 2, cache_modifier=".cg"), tl.load(xp + 3, cache_modifier=".cg"))


@triton.jit
def _q4x32_dot(w, x, USE_ASM: tl.constexpr):
    """Σ q·x/16 per column over the four word blocks ``w`` of a ``QUAD`` cell and their 16
    activation words ``x`` → [GW/4, BLOCK_N]."""
    if USE_ASM:
        return tl.inline_asm_elementwise(
            _Q4X32_DOT_ASM, "=f" + ",r" * 20,
            [w[0], w[1], w[2], w[3], x[0][:, None], x[1][:, None], x[2][:, None], x[3][:, None],
             x[4][:, None], x[5][:, None], x[6][:, None], x[7][:, None], x[8][:, None], x[9][:, None],
             x[10][:, None], x[11][:, None], x[12][:, None], x[13][:, None], x[14][:, None], x[15][:, None]],
            dtype=tl.float32, is_pure=True, pack=1)
    else:
        return (_q4x8_dot_words(w[0], x[0], x[1], x[2], x[3], True, False)
                + _q4x8_dot_words(w[1], x[4], x[5], x[6], x[7], True, False)
                + _q4x8_dot_words(w[2], x[8], x[9], x[10], x[11], True, False)
                + _q4x8_dot_words(w[3], x[12], x[13], x[14], x[15], True, False))


@triton.jit
def _step_group(g, t, n_groups):
    """Group and tile of the next cell: cells run through a tile's groups, then the next tile's."""
    g += 1
    return tl.where(g == n_groups, 0, g), tl.where(g == n_groups, t + 1, t)


@triton.jit
def _next_cell(c, g, t, last, n_groups):
    """Cell index, group and tile one cell on (cells run through a tile's groups, then the next
    tile's), held at ``last``: the ring's loads past the range re-read the last cell."""
    g_next, t_next = _step_group(g, t, n_groups)
    at_end = c >= last
    return tl.minimum(c + 1, last), tl.where(at_end, g, g_next), tl.where(at_end, t, t_next)


@triton.jit
def _gemv_setup(w_ptr, s_ptr, meta_ptr, act_ptr, j, pid, n_prog, GROUP: tl.constexpr, BLOCK_N: tl.constexpr,
                QUAD: tl.constexpr):
    """GEMV ``j``'s load sources (see :func:`_weight_loads`), this program's cell range [c0, c1),
    its last cell, and the tile and group of c0."""
    GW: tl.constexpr = GROUP // 8
    ROWS: tl.constexpr = GW // 4 if QUAD else GW
    row = meta_ptr + j * META_STRIDE
    n_groups, c0, c1 = _cell_range(meta_ptr, j, pid, n_prog, "")
    w_base = w_ptr + tl.multiple_of(tl.load(row + META_W), 16)  # the host aligns every offset to 16
    s_base = s_ptr + tl.multiple_of(tl.load(row + META_S), 16)
    src = (w_base, s_base, act_ptr, n_groups, tl.arange(0, ROWS), tl.arange(0, BLOCK_N))
    t = c0 // n_groups
    return src, c0, c1, tl.maximum(c1 - 1, 0), c0 - t * n_groups, t


@triton.jit
def _first_weights(w_ptr, s_ptr, meta_ptr, act_ptr, j, n_gemv, pid, n_prog, GROUP: tl.constexpr,
                   BLOCK_N: tl.constexpr, QUAD: tl.constexpr, L2_AHEAD: tl.constexpr, THREADS: tl.constexpr):
    """Weights and scales of this program's first two cells of GEMV ``j`` (held at the last GEMV):
    issued before the barrier and the prologue that precede the GEMV, so that their DRAM latency
    overlaps them. With ``L2_AHEAD`` the next ``L2_AHEAD`` cells and the scale rows of every tile
    the range touches are prefetched into L2 as well (DRAM keeps streaming through the barrier)."""
    GW: tl.constexpr = GROUP // 8
    jj = tl.minimum(j, n_gemv - 1)
    src, c0, c1, last, g, t = _gemv_setup(w_ptr, s_ptr, meta_ptr, act_ptr, jj, pid, n_prog, GROUP, BLOCK_N,
                                          QUAD)
    if L2_AHEAD > 0:
        live = (j < n_gemv) & (c1 > c0 + 2)
        n_pf = tl.minimum(c1 - c0 - 2, L2_AHEAD)
        _prefetch(src[0] + (c0 + 2) * (GW * BLOCK_N), n_pf * (GW * BLOCK_N * 4), live, THREADS)
        pairs = (src[3] + 1) // 2
        n_tiles = last // src[3] - t + 1
        _prefetch(src[1] + t * pairs * BLOCK_N, n_tiles * pairs * BLOCK_N * 4, (j < n_gemv) & (c1 > c0),
                  THREADS)
    c = tl.minimum(c0, last)
    first = _weight_loads(src, c, g, t, GW, BLOCK_N, QUAD)
    c, g, t = _next_cell(c, g, t, last, src[3])
    return first, _weight_loads(src, c, g, t, GW, BLOCK_N, QUAD)


@triton.jit
def _gemv_phase(pre, w_ptr, s_ptr, vec_ptr, meta_ptr, act_ptr, out_ptr, j, pid, n_prog,
                GROUP: tl.constexpr, BLOCK_N: tl.constexpr, HAS_BIAS: tl.constexpr, USE_ASM: tl.constexpr,
                QUAD: tl.constexpr, L2_AHEAD: tl.constexpr, THREADS: tl.constexpr):
    """out[n] += Σ_k W_j[n, k] · act[k] over this program's cells (fp32 atomics per tile).

    A register ring of two cells, unrolled by two so that no slot is copied: slot A holds the
    even steps, slot B the odd ones, each reloaded two cells ahead right after it is consumed
    (loads past the range re-read its last cell and are never used). ``pre`` holds the weights of
    the first two cells (:func:`_first_weights`, loaded before the barrier). ``QUAD``: each thread
    takes four K-words of a column at once (:func:`_q4x32_dot`, products summed in fp16x2 over 32
    weights before fp32) instead of one (8 weights). Group and tile indices are stepped, not
    divided, per cell. ``L2_AHEAD`` > 0: each step also prefetches the weights ``L2_AHEAD`` cells
    past the register ring into L2 (one bulk request), so more bytes are in flight than the
    registers hold."""
    GW: tl.constexpr = GROUP // 8
    ROWS: tl.constexpr = GW // 4 if QUAD else GW
    src, c0, c1, last, g, t = _gemv_setup(w_ptr, s_ptr, meta_ptr, act_ptr, j, pid, n_prog, GROUP, BLOCK_N,
                                          QUAD)
    row = meta_ptr + j * META_STRIDE
    dst = (src[3], tl.load(row + META_N).to(tl.int32), vec_ptr + tl.multiple_of(tl.load(row + META_BIAS), 16),
           out_ptr, src[5])
    MODE: tl.constexpr = (HAS_BIAS, USE_ASM, QUAD)
    acc = tl.zeros((ROWS, BLOCK_N), dtype=tl.float32)
    extra = tl.zeros((BLOCK_N,), dtype=tl.float32)
    c_ld = tl.minimum(c0, last)  # the last cell loaded, its group and tile
    g_ld = g
    t_ld = t
    a_w, b_w = pre
    a_x = _act_loads(src, g_ld, GW, QUAD)
    c_ld, g_ld, t_ld = _next_cell(c_ld, g_ld, t_ld, last, src[3])
    b_x = _act_loads(src, g_ld, GW, QUAD)
    LOAD: tl.constexpr = (GW, BLOCK_N, QUAD, L2_AHEAD, THREADS)
    for c in range(c0, c1, 2):
        acc, extra, g, t = _cell_step(a_w, a_x, c, c1, acc, extra, g, t, dst, ROWS, BLOCK_N, MODE)
        c_ld, g_ld, t_ld, a_w, a_x = _refill(src, c_ld, g_ld, t_ld, last, LOAD)
        if c + 1 < c1:
            acc, extra, g, t = _cell_step(b_w, b_x, c + 1, c1, acc, extra, g, t, dst, ROWS, BLOCK_N, MODE)
        c_ld, g_ld, t_ld, b_w, b_x = _refill(src, c_ld, g_ld, t_ld, last, LOAD)


@triton.jit
def _refill(src, c, g, t, last, LOAD: tl.constexpr):
    """Load the ring slot just consumed with the cell after (c, g, t); ``LOAD`` = (GW, BLOCK_N,
    QUAD, L2_AHEAD, THREADS). With ``L2_AHEAD`` the cell that many past it is prefetched into L2.
    Returns the new cell's (c, g, t), weights and activations."""
    GW: tl.constexpr = LOAD[0]
    BLOCK_N: tl.constexpr = LOAD[1]
    QUAD: tl.constexpr = LOAD[2]
    L2_AHEAD: tl.constexpr = LOAD[3]
    c, g, t = _next_cell(c, g, t, last, src[3])
    w = _weight_loads(src, c, g, t, GW, BLOCK_N, QUAD)
    x = _act_loads(src, g, GW, QUAD)
    if L2_AHEAD > 0:
        _prefetch(src[0] + (c + L2_AHEAD) * (GW * BLOCK_N), GW * BLOCK_N * 4, c + L2_AHEAD <= last, LOAD[4])
    return c, g, t, w, x


@triton.jit
def _cell_step(w, x, c, c1, acc, extra, g, t, dst, ROWS: tl.constexpr, BLOCK_N: tl.constexpr,
               MODE: tl.constexpr):
    """Cell ``c`` (group ``g`` of tile ``t``; weights ``w``, activations ``x``) into the tile's
    accumulator; at the tile's (or the range's) last cell the tile's sums go out as fp32 atomics.
    ``dst`` = (groups per tile, output rows, bias, output, column offsets), ``MODE`` = (HAS_BIAS,
    USE_ASM, QUAD). Returns (acc, extra, g, t) of the next cell."""
    n_groups, n_out, b_base, out_ptr, offs_n = dst
    HAS_BIAS: tl.constexpr = MODE[0]
    USE_ASM: tl.constexpr = MODE[1]
    QUAD: tl.constexpr = MODE[2]
    if QUAD:
        part = _q4x32_dot(w, x, USE_ASM)
        sw = w[4]
    else:
        part = _q4x8_dot_words(w[0], x[0], x[1], x[2], x[3], True, USE_ASM)
        sw = w[1]
    acc += part * _scale_of(sw, g)
    if HAS_BIAS:
        if g == 0:  # the range holding a tile's first group adds its bias, exactly once
            extra += tl.load(b_base + t * BLOCK_N + offs_n)
    if (g == n_groups - 1) | (c == c1 - 1):
        rows = t * BLOCK_N + offs_n
        tl.atomic_add(out_ptr + rows, 16.0 * tl.sum(acc, axis=0) + extra, mask=rows < n_out, sem="relaxed")
        acc = tl.zeros((ROWS, BLOCK_N), dtype=tl.float32)
        extra = tl.zeros((BLOCK_N,), dtype=tl.float32)
    g, t = _step_group(g, t, n_groups)
    return acc, extra, g, t


@triton.jit
def _row_stats(src_ptr, n, eps, SRC_BF16: tl.constexpr, BLOCK_D: tl.constexpr):
    """Mean and 1/σ of the length-``n`` row (two-pass, fp32; every program computes them itself)."""
    offs = tl.arange(0, BLOCK_D)
    mask = offs < n
    if SRC_BF16:
        v = tl.load(src_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    else:
        v = tl.load(src_ptr + offs, mask=mask, other=0.0, cache_modifier=".cg")
    mean = tl.sum(v, axis=0) / n
    diff = tl.where(mask, v - mean, 0.0)
    return mean, 1.0 / tl.sqrt(tl.sum(diff * diff, axis=0) / n + eps)


@triton.jit
def _load_pairs(src_ptr, pairs, mask, SRC_BF16: tl.constexpr):
    """Even and odd elements (fp32) of the given pair indices."""
    if SRC_BF16:
        return (tl.load(src_ptr + 2 * pairs, mask=mask, other=0.0).to(tl.float32),
                tl.load(src_ptr + 2 * pairs + 1, mask=mask, other=0.0).to(tl.float32))
    else:
        return (tl.load(src_ptr + 2 * pairs, mask=mask, other=0.0, cache_modifier=".cg"),
                tl.load(src_ptr + 2 * pairs + 1, mask=mask, other=0.0, cache_modifier=".cg"))


@triton.jit
def _gelu_tanh(x):
    """0.5·x·(1 + tanh(√(2/π)(x + 0.044715x³))) = x·σ(2·√(2/π)(x + 0.044715x³))."""
    return x * tl.sigmoid(1.5957691216057308 * (x + 0.044715 * x * x * x))


@triton.jit
def _load_affine(gamma_ptr, beta_ptr, pairs, mask, EVICT: tl.constexpr):
    """γ and β of the given pairs (even, odd elements each; L2 eviction policy ``EVICT``)."""
    return (tl.load(gamma_ptr + 2 * pairs, mask=mask, eviction_policy=EVICT),
            tl.load(gamma_ptr + 2 * pairs + 1, mask=mask, eviction_policy=EVICT),
            tl.load(beta_ptr + 2 * pairs, mask=mask, eviction_policy=EVICT),
            tl.load(beta_ptr + 2 * pairs + 1, mask=mask, eviction_policy=EVICT))


@triton.jit
def _normalize_store(e, o, mask, mean, rstd, affine, act_ptr, pairs):
    """(x - mean)·rstd·γ + β of the given pairs (even, odd elements ``e``, ``o``; ``affine`` from
    :func:`_load_affine`) → packed words."""
    ge, go, be, bo = affine
    packed = _pack_f16x2((e - mean) * rstd * ge + be, (o - mean) * rstd * go + bo)
    tl.store(act_ptr + pairs, packed, mask=mask)


@triton.jit
def _pair_stats(e, o, mask, n, eps):
    """Mean and 1/σ (two-pass, fp32) of a row held as its even and odd elements."""
    mean = (tl.sum(e, axis=0) + tl.sum(o, axis=0)) / n
    de = tl.where(mask, e - mean, 0.0)
    do = tl.where(mask, o - mean, 0.0)
    return mean, 1.0 / tl.sqrt((tl.sum(de * de, axis=0) + tl.sum(do * do, axis=0)) / n + eps)


@triton.jit
def _spans_few_groups(c0, c1, n_groups, HALF: tl.constexpr, BLOCK_S: tl.constexpr):
    """Whether cells [c0, c1) span fewer K-groups than the row and their run of HALF-pair groups
    fits ``BLOCK_S`` pairs: the prologue then builds only that run, and the GEMV reads it."""
    return ((c1 - c0) < n_groups) & ((c1 - c0) * HALF <= BLOCK_S)


@triton.jit
def _own_groups(meta_ptr, j, pid, n_prog, n, GROUP: tl.constexpr, BLOCK_S: tl.constexpr):
    """Whether this program's cells of GEMV ``j`` span fewer K-groups than the length-``n`` row
    (and fit ``BLOCK_S`` pairs), and the pair indices of those groups with their mask (a run that
    may wrap at the row's end)."""
    n_groups, c0, c1 = _cell_range(meta_ptr, j, pid, n_prog, "")
    HALF: tl.constexpr = GROUP // 2
    i = tl.arange(0, BLOCK_S)
    few = _spans_few_groups(c0, c1, n_groups, HALF, BLOCK_S)
    return few, ((c0 % n_groups) * HALF + i) % (n // 2), i < (c1 - c0) * HALF


@triton.jit
def _prologue_ln(src_ptr, gamma_ptr, beta_ptr, act_ptr, n, eps, meta_ptr, j, pid, n_prog, GROUP: tl.constexpr,
                 SRC_BF16: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_S: tl.constexpr, SUBSET: tl.constexpr):
    """LayerNorm(src)·γ + β → this program's own packed activation words, in one round of loads.

    The statistics need the whole row (``BLOCK_P`` ≥ n/2 pairs, loaded at once, two reductions on
    the registers). With ``SUBSET`` only the K-groups of this program's cells of GEMV ``j`` are
    normalized and stored (their elements, γ and β loaded alongside the row), as the pointwise
    prologues do; otherwise, or when the cells span the whole row, all of it."""
    pairs = tl.arange(0, BLOCK_P)
    mask = pairs < n // 2
    few, mine, m = _own_groups(meta_ptr, j, pid, n_prog, n, GROUP, BLOCK_S)
    if SUBSET and few:  # every load is issued before the reductions (one L2 round trip)
        me, mo = _load_pairs(src_ptr, mine, m, SRC_BF16)
        mine_affine = _load_affine(gamma_ptr, beta_ptr, mine, m, "")  # (branch-local names: other shapes)
        e, o = _load_pairs(src_ptr, pairs, mask, SRC_BF16)
        mean, rstd = _pair_stats(e, o, mask, n, eps)
        _normalize_store(me, mo, m, mean, rstd, mine_affine, act_ptr, mine)
    else:
        e, o = _load_pairs(src_ptr, pairs, mask, SRC_BF16)
        affine = _load_affine(gamma_ptr, beta_ptr, pairs, mask, "")
        mean, rstd = _pair_stats(e, o, mask, n, eps)
        _normalize_store(e, o, mask, mean, rstd, affine, act_ptr, pairs)


@triton.jit
def _pointwise_pairs(src_ptr, act_ptr, pairs, mask, GELU: tl.constexpr):
    e, o = _load_pairs(src_ptr, pairs, mask, False)
    if GELU:
        e = _gelu_tanh(e)
        o = _gelu_tanh(o)
    tl.store(act_ptr + pairs, _pack_f16x2(e, o), mask=mask)


@triton.jit
def _prologue_pointwise(src_ptr, act_ptr, n, meta_ptr, j, pid, n_prog, GROUP: tl.constexpr,
                        GELU: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_S: tl.constexpr):
    """src (fp32), through tanh-GELU when ``GELU``, → this program's own packed activation words.

    Only the K-groups of this program's cells of GEMV ``j`` are built when they are fewer than the
    row's (:func:`_own_groups`; ``BLOCK_S`` ≥ that many pairs), else the whole row (``BLOCK_P`` ≥
    n/2 pairs); either way in one round of loads."""
    few, mine, m = _own_groups(meta_ptr, j, pid, n_prog, n, GROUP, BLOCK_S)
    if few:
        _pointwise_pairs(src_ptr, act_ptr, mine, m, GELU)
    else:
        pairs = tl.arange(0, BLOCK_P)
        _pointwise_pairs(src_ptr, act_ptr, pairs, pairs < n // 2, GELU)


@triton.jit
def _slice_offsets(n, pid, n_prog, start, SLICE: tl.constexpr):
    """Offsets and mask of chunk ``start`` of this program's share of [0, n)."""
    per = (n + n_prog - 1) // n_prog
    offs = pid * per + start + tl.arange(0, SLICE)
    return offs, (offs < n) & (offs < (pid + 1) * per)


@triton.jit
def _zero_slice(ptr, n, pid, n_prog, SLICE: tl.constexpr):
    """Zero this program's share of ptr[0:n] (an accumulator a later phase sums into)."""
    for start in range(0, (n + n_prog - 1) // n_prog, SLICE):
        offs, mask = _slice_offsets(n, pid, n_prog, start, SLICE)
        tl.store(ptr + offs, tl.zeros((SLICE,), dtype=tl.float32), mask=mask)


@triton.jit
def _copy_slice(src_ptr, dst_ptr, n, pid, n_prog, SLICE: tl.constexpr):
    """dst[share] = src[share] (bf16 → fp32): the input token becomes the residual."""
    for start in range(0, (n + n_prog - 1) // n_prog, SLICE):
        offs, mask = _slice_offsets(n, pid, n_prog, start, SLICE)
        tl.store(dst_ptr + offs, tl.load(src_ptr + offs, mask=mask).to(tl.float32), mask=mask)


@triton.jit
def _final_norm(res_ptr, gamma_ptr, beta_ptr, out_ptr, n, eps, pid, n_prog,
                BLOCK_D: tl.constexpr, SLICE: tl.constexpr):
    """Final LayerNorm of the residual → this program's slice of the bf16 output."""
    mean, rstd = _row_stats(res_ptr, n, eps, False, BLOCK_D)
    offs, mask = _slice_offsets(n, pid, n_prog, 0, SLICE)
    v = tl.load(res_ptr + offs, mask=mask, other=0.0, cache_modifier=".cg")
    y = (v - mean) * rstd * tl.load(gamma_ptr + offs, mask=mask) + tl.load(beta_ptr + offs, mask=mask)
    tl.store(out_ptr + offs, y.to(tl.bfloat16), mask=mask)


@triton.jit
def _arrive(bar_ptr):
    """Grid barrier, first half: once every thread's stores and atomics of the phase are issued,
    count this program in (a release: its ``membar`` waits for them, and for any load still in
    flight on the arriving thread)."""
    tl.debug_barrier()
    tl.atomic_add(bar_ptr, 1, sem="release", scope="gpu")


@triton.jit
def _await(bar_ptr, err_ptr, target, MAX_SPIN: tl.constexpr, THREADS: tl.constexpr):
    """Grid barrier, second half: poll the counter until ``target`` programs have arrived, then
    acquire. One thread per program polls (:func:`_load_acquire`), so the counter's L2 slice sees
    one request per program and poll, not one per warp. A poll past ``MAX_SPIN`` sets the error
    flag instead of hanging (a grid that is not co-resident)."""
    seen = _load_acquire(bar_ptr, THREADS)
    spins = 0
    while (seen < target) & (spins < MAX_SPIN):
        seen = _load_acquire(bar_ptr, THREADS)
        spins += 1
    if seen < target:
        tl.atomic_max(err_ptr, 1, sem="relaxed", scope="gpu")
    tl.debug_barrier()


@triton.jit
def _load_acquire(ptr, THREADS: tl.constexpr):
    """``ld.acquire.gpu`` of one int32 by thread 0 of the program, shared with every thread (a
    max-reduction over the program; the other threads contribute 0). Later loads of every thread
    are ordered after it by the reduction's CTA barrier."""
    idx = tl.arange(0, THREADS)
    v = tl.inline_asm_elementwise(LOAD_ACQUIRE_BY_THREAD0_ASM, "=r,l,r", [ptr + 0 * idx, idx], dtype=tl.int32,
                                  is_pure=False, pack=1)
    return tl.max(v, axis=0)


@triton.jit
def _stamp(trace_ptr, idx, TRACE: tl.constexpr):
    """With ``TRACE``: ``%globaltimer`` (ns) → trace[idx], after every thread of the program got here."""
    if TRACE:
        tl.debug_barrier()
        t = tl.inline_asm_elementwise("mov.u64 $0, %globaltimer;", "=l,r", [tl.zeros([1], tl.int32)],
                                      dtype=tl.int64, is_pure=False, pack=1)
        tl.store(trace_ptr + idx + tl.arange(0, 1), t)


@triton.jit
def fused_trunk_kernel(x_ptr, out_ptr, w_ptr, s_ptr, vec_ptr, meta_ptr, res_ptr, qkv_ptr, f_ptr, act_ptr,
                       bar_ptr, err_ptr, trace_ptr, n_layers, phase_begin, phase_end, eps,
                       D: tl.constexpr, FFN: tl.constexpr, GROUP: tl.constexpr, BLOCK_N: tl.constexpr,
                       BLOCK_D: tl.constexpr, BLOCK_PD: tl.constexpr, BLOCK_PF: tl.constexpr,
                       BLOCK_S: tl.constexpr, SLICE: tl.constexpr,
                       ACT_STRIDE: tl.constexpr, HAS_BIAS: tl.constexpr, USE_ASM: tl.constexpr,
                       MAX_SPIN: tl.constexpr, TRACE: tl.constexpr, QUAD: tl.constexpr,
                       L2_AHEAD: tl.constexpr, THREADS: tl.constexpr, LN_SUBSET: tl.constexpr,
                       EARLY_ARRIVE: tl.constexpr):
    """Phases [phase_begin, phase_end) of the fused one-token trunk forward (module docstring).

    With ``TRACE`` every program writes four ``%globaltimer`` stamps per phase into
    trace[(pid · n_phases + ph) · 4 + k]: phase start, prologue done, GEMV done, barrier passed."""
    pid = tl.program_id(0)
    n_prog = tl.num_programs(0)
    n_gemv = 4 * n_layers
    mine = act_ptr + pid * ACT_STRIDE  # this program's packed GEMV input
    n_sync = 0
    n_phases = 4 * n_layers + 1
    pre = _first_weights(w_ptr, s_ptr, meta_ptr, mine, phase_begin, n_gemv, pid, n_prog, GROUP, BLOCK_N, QUAD,
                         L2_AHEAD, THREADS)
    for ph in range(phase_begin, phase_end):
        stamps = (pid * n_phases + ph) * 4
        _stamp(trace_ptr, stamps, TRACE)
        layer = ph // 4
        kind = ph % 4
        ln = vec_ptr + layer * 4 * D
        if layer == n_layers:
            _final_norm(res_ptr, ln, ln + D, out_ptr, D, eps, pid, n_prog, BLOCK_D, SLICE)
            _stamp(trace_ptr, stamps + 2, TRACE)
        else:
            if kind == 0:  # LN1 → QKV; the MLP accumulator is zeroed for this layer's FC1
                if layer == 0:
                    _prologue_ln(x_ptr, ln, ln + D, mine, D, eps, meta_ptr, ph, pid, n_prog, GROUP, True,
                                 BLOCK_PD, BLOCK_S, LN_SUBSET)
                    _copy_slice(x_ptr, res_ptr, D, pid, n_prog, SLICE)
                else:
                    _prologue_ln(res_ptr, ln, ln + D, mine, D, eps, meta_ptr, ph, pid, n_prog, GROUP, False,
                                 BLOCK_PD, BLOCK_S, LN_SUBSET)
                _zero_slice(f_ptr, FFN, pid, n_prog, SLICE)
                dst = qkv_ptr
            elif kind == 1:  # attention over one key = v → O, added into the residual
                _prologue_pointwise(qkv_ptr + 2 * D, mine, D, meta_ptr, ph, pid, n_prog, GROUP, False,
                                    BLOCK_PD, BLOCK_S)
                dst = res_ptr
            elif kind == 2:  # LN2 → FC1; the QKV accumulator is zeroed for the next layer
                _prologue_ln(res_ptr, ln + 2 * D, ln + 3 * D, mine, D, eps, meta_ptr, ph, pid, n_prog, GROUP,
                             False, BLOCK_PD, BLOCK_S, LN_SUBSET)
                _zero_slice(qkv_ptr, 3 * D, pid, n_prog, SLICE)
                dst = f_ptr
            else:  # GELU → FC2, added into the residual
                _prologue_pointwise(f_ptr, mine, FFN, meta_ptr, ph, pid, n_prog, GROUP, True, BLOCK_PF,
                                    BLOCK_S)
                dst = res_ptr
            tl.debug_barrier()  # the packed input is written before any thread reads it
            _stamp(trace_ptr, stamps + 1, TRACE)
            _gemv_phase(pre, w_ptr, s_ptr, vec_ptr, meta_ptr, mine, dst, ph, pid, n_prog, GROUP, BLOCK_N,
                        HAS_BIAS, USE_ASM, QUAD, L2_AHEAD, THREADS)
            _stamp(trace_ptr, stamps + 2, TRACE)
            if EARLY_ARRIVE and (ph + 1 < phase_end):
                _arrive(bar_ptr)  # before the loads below, so that its membar need not wait for them
            # the next GEMV's first weights stream in during the barrier and its prologue
            pre = _first_weights(w_ptr, s_ptr, meta_ptr, mine, ph + 1, n_gemv, pid, n_prog, GROUP, BLOCK_N,
                                 QUAD, L2_AHEAD, THREADS)
        if ph + 1 < phase_end:  # (the final LayerNorm is the last phase: a barrier follows a GEMV)
            n_sync += 1
            if not EARLY_ARRIVE:
                _arrive(bar_ptr)
            _await(bar_ptr, err_ptr, n_sync * n_prog, MAX_SPIN, THREADS)
        _stamp(trace_ptr, stamps + 3, TRACE)
    if n_sync > 0:  # the last program out resets the counters for the next launch
        tl.debug_barrier()
        if tl.atomic_add(bar_ptr + 1, 1, sem="acq_rel", scope="gpu") == n_prog - 1:
            tl.atomic_xchg(bar_ptr, 0, sem="relaxed", scope="gpu")
            tl.atomic_xchg(bar_ptr + 1, 0, sem="relaxed", scope="gpu")
