"""Triton kernels for small-M weight-only quantized matmuls (imported lazily by ``kernels.py``).

All matmul kernels compute ``out[m, n] = sum_k x[m, k] * W[n, k] (+ bias[n])`` for an
``nn.Linear`` weight W (N, K) stored quantized (formats in :mod:`daptq_ros.gpu.packing`):

- The grid is (N tiles, M tiles, K splits). Each program streams a BLOCK_N × (K / SPLIT_K) slab of
  quantized weights exactly once, dequantizes it in registers and feeds the tensor cores; with
  split-K (M = 1..16 gives too few N tiles to fill 132 SMs) the fp32 partials go to a workspace,
  summed either by :func:`splitk_reduce_kernel` (a second launch) or inside the same launch by
  the last split of each tile to finish (``SPLIT_MODE`` 2, see :func:`_epilogue`). Both sum in
  split order: deterministic, no memset.
- ``SWAP_AB`` computes the transposed tile ``acc[BLOCK_N, BLOCK_M] = W_tile · x_tileᵀ`` so that the
  large weight dimension is the MMA's M (Hopper's wgmma needs M ≥ 64) and the few tokens are its N
  (≥ 8): the standard small-M layout; the dequantized weights are then the register operand.
- ``MODE`` picks the dequantization: 0 = integer → fp16 conversion, 1 = fp16 "magic number"
  (OR the offset-binary integer into the mantissa of 1024.0 and subtract, no int→float conversion
  instruction; exact for |q| ≤ 1023), 2 = integer → bf16 conversion. Modes 0/1 run the dot in fp16
  (activations are converted bf16 → fp16, exact for |x| < 65504: the trunk's inputs are LayerNorm
  / GELU outputs); mode 2 keeps bf16 operands. Accumulation is always fp32.
- Group-wise int4 applies the scale once per K-block to the fp32 partial product
  (``BLOCK_K`` divides the group size), not per weight element.
- Integer bit manipulation is done in int32 (the hardware has no narrower ALU) with explicit
  fp16 constants, so type promotion is the same in every Triton version.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _dequant_int4(b, MODE: tl.constexpr):
    """uint8 bytes (two's-complement nibbles, low = even k) → (low, high) float tiles."""
    v = b.to(tl.int32)
    if MODE == 1:
        u = v ^ 0x88  # offset binary: nibble = q + 8
        lo_bits = ((u & 0xF) | 0x6400).to(tl.uint16)
        hi_bits = (((u >> 4) & 0xF) | 0x6400).to(tl.uint16)
        bias = tl.full([1, 1], 1032.0, tl.float16)  # 1024 + 8
        lo = lo_bits.to(tl.float16, bitcast=True) - bias
        hi = hi_bits.to(tl.float16, bitcast=True) - bias
    elif MODE == 0:
        lo = ((v << 28) >> 28).to(tl.float16)  # arithmetic shift sign-extends the nibble
        hi = ((v << 24) >> 28).to(tl.float16)
    else:
        lo = ((v << 28) >> 28).to(tl.float32).to(tl.bfloat16)
        hi = ((v << 24) >> 28).to(tl.float32).to(tl.bfloat16)
    return lo, hi


@triton.jit
def _dequant_int8(w, MODE: tl.constexpr):
    """int8 tile → float tile of the integers (scales are applied to the fp32 accumulator)."""
    if MODE == 1:
        u = (w.to(tl.int32) + 128) | 0x6400  # offset binary in the mantissa of 1024.0
        bias = tl.full([1, 1], 1152.0, tl.float16)  # 1024 + 128
        out = u.to(tl.uint16).to(tl.float16, bitcast=True) - bias
    elif MODE == 0:
        out = w.to(tl.float16)
    else:
        out = w.to(tl.float32).to(tl.bfloat16)
    return out


@triton.jit
def _finish(acc, out_ptr, bias_ptr, rel, mask, offs_n, n_mask, SWAP_AB: tl.constexpr, HAS_BIAS: tl.constexpr):
    """Add the bias and store the finished fp32 tile in the output dtype."""
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
        if SWAP_AB:
            acc = acc + bias[:, None]
        else:
            acc = acc + bias[None, :]
    tl.store(out_ptr + rel, acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _epilogue(acc, out_ptr, ws_ptr, cnt_ptr, bias_ptr, offs_m, offs_n, M, N, stride_om, stride_os,
              SWAP_AB: tl.constexpr, HAS_BIAS: tl.constexpr, SPLIT_MODE: tl.constexpr):
    """Write a tile: 0 = to the output; 1 = the fp32 partial to the split-K workspace (a separate
    reduction launch finishes); 2 = the partial to the workspace, then the last of the tile's
    splits to arrive sums all partials in split order and writes the output (one launch,
    deterministic, the CUTLASS split-K semaphore pattern: every thread stores, barrier, one
    release/acquire atomic; the last block resets the tile's counter to 0 for the next launch)."""
    m_mask = offs_m < M
    n_mask = offs_n < N
    if SWAP_AB:
        rel = offs_m[None, :] * stride_om + offs_n[:, None]
        mask = n_mask[:, None] & m_mask[None, :]
    else:
        rel = offs_m[:, None] * stride_om + offs_n[None, :]
        mask = m_mask[:, None] & n_mask[None, :]
    if SPLIT_MODE == 0:
        _finish(acc, out_ptr, bias_ptr, rel, mask, offs_n, n_mask, SWAP_AB, HAS_BIAS)
    else:
        pid_k = tl.program_id(2)
        tl.store(ws_ptr + pid_k * stride_os + rel, acc, mask=mask)
        if SPLIT_MODE == 2:
            n_splits = tl.num_programs(2)
            tile = tl.program_id(1) * tl.num_programs(0) + tl.program_id(0)
            tl.debug_barrier()  # all of this block's partial stores precede the release below
            arrived = tl.atomic_add(cnt_ptr + tile, 1, sem="acq_rel")
            if arrived == n_splits - 1:
                total = tl.zeros_like(acc)
                for sk in range(n_splits):  # .cg: read through L2, never a stale L1 line
                    total += tl.load(ws_ptr + sk * stride_os + rel, mask=mask, other=0.0,
                                     cache_modifier=".cg")
                _finish(total, out_ptr, bias_ptr, rel, mask, offs_n, n_mask, SWAP_AB, HAS_BIAS)
                tl.atomic_xchg(cnt_ptr + tile, 0)


@triton.jit
def _tile_ranges(N, K, k_blocks_per_split, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_K: tl.constexpr, EVEN_N: tl.constexpr):
    """Grid (N tile, M tile, K split) → token offsets, output offsets, output rows wrapped in range
    for the loads (``ld_n``), and the split's K-block range [kb0, kb1)."""
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    if EVEN_N:
        ld_n = offs_n
    else:
        ld_n = offs_n % N
    kb0 = tl.program_id(2) * k_blocks_per_split
    return offs_m, offs_n, ld_n, kb0, tl.minimum(kb0 + k_blocks_per_split, K // BLOCK_K)


@triton.jit
def _mma_tile(M, N, K, k_blocks_per_split, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
              BLOCK_K: tl.constexpr, SWAP_AB: tl.constexpr, EVEN_N: tl.constexpr):
    """The tensor-core kernels' tile: token and output offsets, their wrapped load indices
    (out-of-range rows/columns load valid memory and are masked at the store, so the streaming
    loads need no masks), this split's K-block range [kb0, kb1) and the zeroed accumulator."""
    offs_m, offs_n, ld_n, kb0, kb1 = _tile_ranges(N, K, k_blocks_per_split, BLOCK_M, BLOCK_N, BLOCK_K, EVEN_N)
    if SWAP_AB:
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    return offs_m, offs_n, offs_m % M, ld_n, kb0, kb1, acc


@triton.jit(do_not_specialize=["M", "k_blocks_per_split"])
def w4a16_kernel(x_ptr, w_ptr, s_ptr, bias_ptr, out_ptr, ws_ptr, cnt_ptr,
                 M, N, K, stride_xm, stride_wn, stride_sg, stride_om, stride_os, k_blocks_per_split,
                 GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                 SWAP_AB: tl.constexpr, MODE: tl.constexpr, HAS_BIAS: tl.constexpr,
                 SPLIT_MODE: tl.constexpr, EVEN_N: tl.constexpr):
    """W4A16: x (M, K) bf16 · packed int4 W (N, K/2) with bf16 group scales (K/GROUP, N)."""
    HALF: tl.constexpr = BLOCK_K // 2
    offs_m, offs_n, ld_m, ld_n, kb0, kb1, acc = _mma_tile(M, N, K, k_blocks_per_split, BLOCK_M, BLOCK_N,
                                                         BLOCK_K, SWAP_AB, EVEN_N)
    offs_j = kb0 * HALF + tl.arange(0, HALF)
    offs_k = kb0 * BLOCK_K + tl.arange(0, BLOCK_K)
    w_ptrs = w_ptr + ld_n[:, None] * stride_wn + offs_j[None, :]
    x_ptrs = x_ptr + ld_m[:, None] * stride_xm + offs_k[None, :]
    for kb in range(kb0, kb1):
        b = tl.load(w_ptrs)
        x = tl.load(x_ptrs)
        s = tl.load(s_ptr + (kb * BLOCK_K // GROUP) * stride_sg + ld_n).to(tl.float32)
        lo, hi = _dequant_int4(b, MODE)
        # Interleave back to K order: element (n, 2j + t) is nibble t of byte j.
        w = tl.reshape(tl.join(lo, hi), (BLOCK_N, BLOCK_K))
        x = x.to(w.dtype)
        if SWAP_AB:
            acc += tl.dot(w, tl.trans(x)) * s[:, None]
        else:
            acc += tl.dot(x, tl.trans(w)) * s[None, :]
        w_ptrs += HALF
        x_ptrs += BLOCK_K
    _epilogue(acc, out_ptr, ws_ptr, cnt_ptr, bias_ptr, offs_m, offs_n, M, N, stride_om, stride_os,
              SWAP_AB, HAS_BIAS, SPLIT_MODE)


@triton.jit(do_not_specialize=["M", "k_blocks_per_split"])
def w8a16_kernel(x_ptr, w_ptr, s_ptr, bias_ptr, out_ptr, ws_ptr, cnt_ptr,
                 M, N, K, stride_xm, stride_wn, stride_om, stride_os, k_blocks_per_split,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                 SWAP_AB: tl.constexpr, MODE: tl.constexpr, HAS_BIAS: tl.constexpr,
                 SPLIT_MODE: tl.constexpr, EVEN_N: tl.constexpr):
    """W8A16: x (M, K) bf16 · int8 W (N, K) with fp32 per-output-channel scales (N,)."""
    offs_m, offs_n, ld_m, ld_n, kb0, kb1, acc = _mma_tile(M, N, K, k_blocks_per_split, BLOCK_M, BLOCK_N,
                                                         BLOCK_K, SWAP_AB, EVEN_N)
    offs_k = kb0 * BLOCK_K + tl.arange(0, BLOCK_K)
    w_ptrs = w_ptr + ld_n[:, None] * stride_wn + offs_k[None, :]
    x_ptrs = x_ptr + ld_m[:, None] * stride_xm + offs_k[None, :]
    for _kb in range(kb0, kb1):
        w = _dequant_int8(tl.load(w_ptrs), MODE)
        x = tl.load(x_ptrs).to(w.dtype)
        if SWAP_AB:
            acc = tl.dot(w, tl.trans(x), acc)
        else:
            acc = tl.dot(x, tl.trans(w), acc)
        w_ptrs += BLOCK_K
        x_ptrs += BLOCK_K
    s = tl.load(s_ptr + ld_n).to(tl.float32)
    if SWAP_AB:
        acc = acc * s[:, None]
    else:
        acc = acc * s[None, :]
    _epilogue(acc, out_ptr, ws_ptr, cnt_ptr, bias_ptr, offs_m, offs_n, M, N, stride_om, stride_os,
              SWAP_AB, HAS_BIAS, SPLIT_MODE)


@triton.jit
def splitk_reduce_kernel(ws_ptr, bias_ptr, out_ptr, MN, N, SPLIT,
                         HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr):
    """out (M, N) = sum over splits of the fp32 workspace (SPLIT, M, N) (+ bias), cast to out's dtype."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < MN
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for s in range(SPLIT):
        acc += tl.load(ws_ptr + s * MN + offs, mask=mask, other=0.0)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs % N, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def rowquant_int8_kernel(x_ptr, q_ptr, s_ptr, M, K, stride_xm, BLOCK_K: tl.constexpr):
    """Dynamic symmetric per-row int8: q = round(x / s), s = max|x| / 127; rows ≥ M are zero padding."""
    row = tl.program_id(0)
    offs = tl.arange(0, BLOCK_K)
    kmask = offs < K
    valid = (offs * 0 + row) < M  # as a tensor: padding rows load nothing
    x = tl.load(x_ptr + row * stride_xm + offs, mask=kmask & valid, other=0.0).to(tl.float32)
    amax = tl.max(tl.abs(x), axis=0)
    scale = tl.maximum(amax / 127.0, 1e-12)
    v = x / scale
    q = tl.where(v >= 0, tl.floor(v + 0.5), tl.ceil(v - 0.5))  # round half away from zero
    q = tl.minimum(tl.maximum(q, -127.0), 127.0)
    tl.store(q_ptr + row * K + offs, q.to(tl.int8), mask=kmask)
    tl.store(s_ptr + row, scale)


@triton.jit
def intmm_epilogue_kernel(acc_ptr, sx_ptr, sw_ptr, bias_ptr, out_ptr, M, N,
                          HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """out (M, N) = int32 acc · sx[m] · sw[n] (+ bias[n]) in fp32, cast to out's dtype."""
    offs_m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (offs_m < M)[:, None] & (offs_n < N)[None, :]
    acc = tl.load(acc_ptr + offs_m[:, None] * N + offs_n[None, :], mask=mask, other=0).to(tl.float32)
    sx = tl.load(sx_ptr + offs_m, mask=offs_m < M, other=0.0)
    sw = tl.load(sw_ptr + offs_n, mask=offs_n < N, other=0.0)
    out = acc * sx[:, None] * sw[None, :]
    if HAS_BIAS:
        out += tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + offs_m[:, None] * N + offs_n[None, :], out.to(out_ptr.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------------------------------------
# GEMV path for very few tokens (M = 1..8): no tl.dot, CUDA-core FMAs on dequantized fp32 weights.
#
# With M = 1 a tensor-core tile pads the token dimension to ≥ 8–16 rows and every K-block pays a
# register→shared layout round trip for the int4 interleave; the work per weight is tiny, so
# the kernel should only stream bytes. These kernels load the packed weights as 32-bit words
# (8 int4 / 4 int8 per load element; each thread issues 16-byte loads), never interleave them:
# nibble i of word c is k = 8c + i, so the activations are read as 8 (int4) or 4 (int8) strided
# slices instead. Dequantization is one shift + one LOP (mask | exponent) per weight — the
# offset-binary integer t goes straight into the mantissa of 1.0 (f = 1 + t/128 for int4,
# 1 + t/256 for int8) and the affine correction is applied to the row sums:
#     Σ q·x = 128·Σ f·x − 136·Σ x  (int4, q = t − 8),   Σ q·x = 256·Σ f·x − 384·Σ x  (int8).
# No int→float conversion, fp32 FMAs only; the offset (≈ 1.0 per weight) costs ~4 of fp32's 24
# mantissa bits, far below the bf16 output rounding. Split-K / epilogue as in the tl.dot kernels.
# ---------------------------------------------------------------------------------------------


@triton.jit
def _nibble_f32(u, POS: tl.constexpr):
    """Nibble POS (bits 4·POS..4·POS+3, offset binary t) of int32 words → float32 1 + t/128."""
    if POS < 4:
        v = u << (16 - 4 * POS)
    elif POS > 4:
        v = u >> (4 * POS - 16)
    else:
        v = u
    return ((v & 0x000F0000) | 0x3F800000).to(tl.float32, bitcast=True)


@triton.jit
def _byte_f32(u, POS: tl.constexpr):
    """Byte POS (bits 8·POS..8·POS+7, offset binary t) of int32 words → float32 1 + t/256."""
    if POS == 0:
        v = u << 15
    elif POS == 1:
        v = u << 7
    elif POS == 2:
        v = u >> 1
    else:
        v = u >> 9
    return ((v & 0x007F8000) | 0x3F800000).to(tl.float32, bitcast=True)


@triton.jit
def _gemv_tile(w_ptr, N, K, stride_wn, k_blocks_per_split, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
               BLOCK_K: tl.constexpr, WORDS: tl.constexpr, EVEN_N: tl.constexpr):
    """This program's token rows, output rows (``ld_n``: wrapped in range for the loads), word
    offsets within a K-block, K-block range [kb0, kb1) of its split, and its first weight words."""
    offs_m, offs_n, ld_n, kb0, kb1 = _tile_ranges(N, K, k_blocks_per_split, BLOCK_M, BLOCK_N, BLOCK_K, EVEN_N)
    offs_c = tl.arange(0, WORDS)
    w_ptrs = w_ptr + ld_n[:, None] * stride_wn + (kb0 * WORDS + offs_c)[None, :]
    return offs_m, offs_n, ld_n, offs_c, kb0, kb1, w_ptrs


@triton.jit
def _group_scales(s_ptrs, kb, offs_c, stride_sg, GROUP: tl.constexpr, BLOCK_K: tl.constexpr):
    """fp32 group scales of K-block ``kb`` broadcastable to its [BLOCK_N, WORDS] words: one per row
    when the block lies inside one group, else a tile (word c in group kb·BLOCK_K/GROUP + c·8/GROUP)."""
    if BLOCK_K <= GROUP:
        return tl.load(s_ptrs + (kb * BLOCK_K // GROUP) * stride_sg).to(tl.float32)[:, None]
    else:
        g = kb * (BLOCK_K // GROUP) + offs_c // (GROUP // 8)
        return tl.load(s_ptrs[:, None] + g[None, :] * stride_sg).to(tl.float32)


@triton.jit(do_not_specialize=["M", "k_blocks_per_split"])
def w4a16_gemv_kernel(x_ptr, w_ptr, s_ptr, bias_ptr, out_ptr, ws_ptr, cnt_ptr,
                      M, N, K, stride_xm, stride_wn, stride_sg, stride_om, stride_os, k_blocks_per_split,
                      GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                      BLOCK_K: tl.constexpr, HAS_BIAS: tl.constexpr, SPLIT_MODE: tl.constexpr,
                      EVEN_N: tl.constexpr):
    """W4A16 GEMV: x (M, K) bf16 · int4 W as int32 words (N, K/8) with bf16 group scales (K/GROUP, N).

    BLOCK_M = 1: one token row per program (grid axis 1 = M), 2-D [BLOCK_N, BLOCK_K/8] tiles.
    BLOCK_M > 1: BLOCK_M rows share each dequantized tile (3-D broadcast, one reduction per block).
    BLOCK_K divides GROUP (one scale per row and K-block) or is a multiple of it (a [BLOCK_N, WORDS]
    scale tile: word c of the block belongs to group c // (GROUP / 8)), so one iteration can move
    more bytes than one group holds.
    """
    pid_m = tl.program_id(1)
    WORDS: tl.constexpr = BLOCK_K // 8
    offs_m, offs_n, ld_n, offs_c, kb0, kb1, w_ptrs = _gemv_tile(
        w_ptr, N, K, stride_wn, k_blocks_per_split, BLOCK_M, BLOCK_N, BLOCK_K, WORDS, EVEN_N)
    s_ptrs = s_ptr + ld_n
    if BLOCK_M == 1:
        # Elementwise accumulation, one cross-lane reduction at the end: the group scale is applied
        # to each (row, word) partial (2 FMAs per 8 weights) instead of reducing every K-block.
        acc2 = tl.zeros((BLOCK_N, WORDS), dtype=tl.float32)
        x_ptrs = x_ptr + pid_m * stride_xm + kb0 * BLOCK_K + 8 * offs_c
        for kb in range(kb0, kb1):
            u = tl.load(w_ptrs) ^ -0x77777778  # 0x88888888: two's complement → offset binary
            t2 = tl.zeros((BLOCK_N, WORDS), dtype=tl.float32)
            xs = tl.zeros((WORDS,), dtype=tl.float32)
            for i in tl.static_range(8):
                xi = tl.load(x_ptrs + i).to(tl.float32)
                t2 += _nibble_f32(u, i) * xi[None, :]
                xs += xi
            s2 = _group_scales(s_ptrs, kb, offs_c, stride_sg, GROUP, BLOCK_K)
            acc2 += t2 * (128.0 * s2) - xs[None, :] * (136.0 * s2)
            w_ptrs += WORDS
            x_ptrs += BLOCK_K
        acc = tl.sum(acc2, axis=1)[None, :]
    else:
        ld_m = offs_m % M
        acc3 = tl.zeros((BLOCK_M, BLOCK_N, WORDS), dtype=tl.float32)
        x_ptrs = x_ptr + ld_m[:, None] * stride_xm + (kb0 * BLOCK_K + 8 * offs_c)[None, :]
        for kb in range(kb0, kb1):
            u = tl.load(w_ptrs) ^ -0x77777778
            t3 = tl.zeros((BLOCK_M, BLOCK_N, WORDS), dtype=tl.float32)
            xs = tl.zeros((BLOCK_M, WORDS), dtype=tl.float32)
            for i in tl.static_range(8):
                xi = tl.load(x_ptrs + i).to(tl.float32)
                t3 += _nibble_f32(u, i)[None, :, :] * xi[:, None, :]
                xs += xi
            s2 = _group_scales(s_ptrs, kb, offs_c, stride_sg, GROUP, BLOCK_K)
            acc3 += t3 * (128.0 * s2)[None, :, :] - xs[:, None, :] * (136.0 * s2)[None, :, :]
            w_ptrs += WORDS
            x_ptrs += BLOCK_K
        acc = tl.sum(acc3, axis=2)
    _epilogue(acc, out_ptr, ws_ptr, cnt_ptr, bias_ptr, offs_m, offs_n, M, N, stride_om, stride_os,
              False, HAS_BIAS, SPLIT_MODE)


@triton.jit(do_not_specialize=["M", "k_blocks_per_split"])
def w8a16_gemv_kernel(x_ptr, w_ptr, s_ptr, bias_ptr, out_ptr, ws_ptr, cnt_ptr,
                      M, N, K, stride_xm, stride_wn, stride_om, stride_os, k_blocks_per_split,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                      HAS_BIAS: tl.constexpr, SPLIT_MODE: tl.constexpr, EVEN_N: tl.constexpr):
    """W8A16 GEMV: x (M, K) bf16 · int8 W as int32 words (N, K/4) with fp32 per-channel scales (N,).

    Per-channel scales allow elementwise accumulation over all K-blocks and one reduction at the end.
    """
    pid_m = tl.program_id(1)
    WORDS: tl.constexpr = BLOCK_K // 4
    offs_m, offs_n, ld_n, offs_c, kb0, kb1, w_ptrs = _gemv_tile(
        w_ptr, N, K, stride_wn, k_blocks_per_split, BLOCK_M, BLOCK_N, BLOCK_K, WORDS, EVEN_N)
    s = tl.load(s_ptr + ld_n).to(tl.float32)
    if BLOCK_M == 1:
        t2 = tl.zeros((BLOCK_N, WORDS), dtype=tl.float32)
        xs = tl.zeros((WORDS,), dtype=tl.float32)
        x_ptrs = x_ptr + pid_m * stride_xm + kb0 * BLOCK_K + 4 * offs_c
        for _kb in range(kb0, kb1):
            u = tl.load(w_ptrs) ^ -0x7F7F7F80  # 0x80808080: two's complement → offset binary
            for i in tl.static_range(4):
                xi = tl.load(x_ptrs + i).to(tl.float32)
                t2 += _byte_f32(u, i) * xi[None, :]
                xs += xi
            w_ptrs += WORDS
            x_ptrs += BLOCK_K
        acc = ((256.0 * tl.sum(t2, axis=1) - 384.0 * tl.sum(xs, axis=0)) * s)[None, :]
    else:
        ld_m = offs_m % M
        t3 = tl.zeros((BLOCK_M, BLOCK_N, WORDS), dtype=tl.float32)
        xs = tl.zeros((BLOCK_M, WORDS), dtype=tl.float32)
        x_ptrs = x_ptr + ld_m[:, None] * stride_xm + (kb0 * BLOCK_K + 4 * offs_c)[None, :]
        for _kb in range(kb0, kb1):
            u = tl.load(w_ptrs) ^ -0x7F7F7F80
            for i in tl.static_range(4):
                xi = tl.load(x_ptrs + i).to(tl.float32)
                t3 += _byte_f32(u, i)[None, :, :] * xi[:, None, :]
                xs += xi
            w_ptrs += WORDS
            x_ptrs += BLOCK_K
        acc = (256.0 * tl.sum(t3, axis=2) - 384.0 * tl.sum(xs, axis=1)[:, None]) * s[None, :]
    _epilogue(acc, out_ptr, ws_ptr, cnt_ptr, bias_ptr, offs_m, offs_n, M, N, stride_om, stride_os,
              False, HAS_BIAS, SPLIT_MODE)


# ---------------------------------------------------------------------------------------------
# W4A16 GEMV on packed fp16x2 math (M ≤ 8), weights K-major.
#
# Weights are int32 words (K/8, N): word (c, n) holds k = 8c..8c+7 of output row n as offset-binary
# nibbles (t = q + 8) in the interleaved order of FasterTransformer / Marlin — k = 8c + 2j at bits
# 4j..4j+3 and k = 8c + 2j + 1 at bits 16+4j..19+4j — so that one LOP3 with 0x000F000F (after a
# shift of 0 or 8; 0x00F000F0 for odd j) lands two weights of adjacent k in the mantissas of an
# fp16x2 pair 1024 + t (or 1024 + 16t), and one fp16x2 FMA turns each pair into exact (q / 16).
# The activation pairs (x[2i], x[2i+1]) are one int32 word of the bf16 row, converted once per
# program and K-block to fp16x2 and shared by all of the thread's output rows; HFMA2 then does
# two multiply-adds per instruction. Per 8 weights: 1 shift, 4 LOP3, 4 HFMA2 (dequant), 4 HFMA2
# (dot), and the fp16 → fp32 unpack of the pair sum: 2.8 sm_90 SASS instructions per weight, 5.0
# in the fp32 GEMV above (``test_f16x2_gemv_needs_fewer_instructions_per_weight``). K-major words
# make a warp's 16-byte loads contiguous along N and keep every K-word of a column in one thread,
# so the K reduction is register-only.
#
# Range: a lane sums 4 products (q/16)·x with |q/16| ≤ 1/2 in fp16 (11-bit mantissa, ≥ the bf16
# input's 8), so |x| < 32768 cannot overflow; the pair sum goes to fp32 before the group scale.
# ``USE_ASM`` False computes the same sum in fp32 with plain Triton ops (the CPU interpreter cannot
# run inline PTX); tests check both paths against float32.
# ---------------------------------------------------------------------------------------------

# The dequantization constants (fp16x2 registers) and the per-word dequantization: a word's
# eight offset-binary nibbles → four fp16x2 registers a, b, c, d of q/16, one weight pair each.
Q4_DEQUANT_CONSTS_PTX = ("mov.b32 k16, 0x2C002C00;", "mov.b32 kb16, 0xD408D408;",
                         "mov.b32 k256, 0x1C001C00;", "mov.b32 kb256, 0xC480C480;")


def q4_dequant_word_ptx(word: str) -> list[str]:
    """PTX lines dequantizing the K-major int4 word in register ``word`` into a, b, c, d (the
    registers v, k16, kb16, k256, kb256 must be declared; the constants set by
    :data:`Q4_DEQUANT_CONSTS_PTX`)."""
    return [f"lop3.b32 a, {word}, 0x000F000F, 0x64006400, 0xEA;",
            f"lop3.b32 b, {word}, 0x00F000F0, 0x64006400, 0xEA;",
            f"shr.u32 v, {word}, 8;",
            "lop3.b32 c, v, 0x000F000F, 0x64006400, 0xEA;",
            "lop3.b32 d, v, 0x00F000F0, 0x64006400, 0xEA;",
            "fma.rn.f16x2 a, a, k16, kb16;", "fma.rn.f16x2 b, b, k256, kb256;",
            "fma.rn.f16x2 c, c, k16, kb16;", "fma.rn.f16x2 d, d, k256, kb256;"]


_Q4X8_DOT_ASM = tl.constexpr("\n".join([
    "{", ".reg .b32 a, b, c, d, v, k16, kb16, k256, kb256, acc;", ".reg .b16 lo, hi;", ".reg .f32 flo, fhi;",
    *Q4_DEQUANT_CONSTS_PTX, *q4_dequant_word_ptx("$1"),
    "mul.rn.f16x2 acc, a, $2;", "fma.rn.f16x2 acc, b, $3, acc;", "fma.rn.f16x2 acc, c, $4, acc;",
    "fma.rn.f16x2 acc, d, $5, acc;", "mov.b32 {lo, hi}, acc;", "cvt.f32.f16 flo, lo;", "cvt.f32.f16 fhi, hi;",
    "add.f32 $0, flo, fhi;", "}"]))
# The constants: 1/16 = 0x2C00, −(1032/16) = −64.5 = 0xD408, 1/256 = 0x1C00, −4.5 = 0xC480, so
# (1024 + t)/16 − 64.5 = (1024 + 16t)/256 − 4.5 = (t − 8)/16 = q/16, exactly.


@triton.jit
def _bf16x2_to_f16x2(xw, USE_ASM: tl.constexpr):
    """int32 words of two bf16 (low half = even k) → (packed fp16x2 words, or the fp32 pair)."""
    lo = (xw << 16).to(tl.float32, bitcast=True)
    hi = (xw & -65536).to(tl.float32, bitcast=True)
    if USE_ASM:
        return tl.inline_asm_elementwise("cvt.rn.f16x2.f32 $0, $1, $2;", "=r,f,f", [hi, lo],
                                         dtype=tl.int32, is_pure=True, pack=1), hi
    else:
        return lo, hi


@triton.jit
def _q4x8_dot(u, x0, x1, x2, x3, y0, y1, y2, y3, USE_ASM: tl.constexpr):
    """Σ_k q_k·x_k / 16 over the 8 weights of each K-major word ``u`` (interleaved offset-binary
    nibbles). With ``USE_ASM`` the x_j are fp16x2 pair words (y_j unused); without, x_j / y_j are
    the fp32 even / odd values of pair j and the sum is taken in fp32."""
    if USE_ASM:
        return tl.inline_asm_elementwise(_Q4X8_DOT_ASM, "=f,r,r,r,r,r", [u, x0, x1, x2, x3],
                                         dtype=tl.float32, is_pure=True, pack=1)
    else:
        t = ((u & 0xF) - 8).to(tl.float32) * x0 + (((u >> 16) & 0xF) - 8).to(tl.float32) * y0
        t += (((u >> 4) & 0xF) - 8).to(tl.float32) * x1 + (((u >> 20) & 0xF) - 8).to(tl.float32) * y1
        t += (((u >> 8) & 0xF) - 8).to(tl.float32) * x2 + (((u >> 24) & 0xF) - 8).to(tl.float32) * y2
        t += (((u >> 12) & 0xF) - 8).to(tl.float32) * x3 + (((u >> 28) & 0xF) - 8).to(tl.float32) * y3
        return t * 0.0625


@triton.jit
def _f16x2_words_to_pair(w, USE_ASM: tl.constexpr):
    """Packed fp16x2 words → what :func:`_q4x8_dot` takes: the words themselves (inline PTX), or
    the fp32 (even, odd) values."""
    if USE_ASM:
        return w, w
    else:
        lo = (w & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
        hi = (w >> 16).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
        return lo, hi


@triton.jit
def _q4x8_dot_words(u, w0, w1, w2, w3, F16X2_IN: tl.constexpr, USE_ASM: tl.constexpr):
    """:func:`_q4x8_dot` of K-major words ``u`` [WORDS, BLOCK_N] with the activation-pair words
    w_j [WORDS] of each K-word: bf16 pairs (converted here) or, with ``F16X2_IN``, packed fp16x2."""
    if F16X2_IN:
        x0, y0 = _f16x2_words_to_pair(w0, USE_ASM)
        x1, y1 = _f16x2_words_to_pair(w1, USE_ASM)
        x2, y2 = _f16x2_words_to_pair(w2, USE_ASM)
        x3, y3 = _f16x2_words_to_pair(w3, USE_ASM)
    else:
        x0, y0 = _bf16x2_to_f16x2(w0, USE_ASM)
        x1, y1 = _bf16x2_to_f16x2(w1, USE_ASM)
        x2, y2 = _bf16x2_to_f16x2(w2, USE_ASM)
        x3, y3 = _bf16x2_to_f16x2(w3, USE_ASM)
    return _q4x8_dot(u, x0[:, None], x1[:, None], x2[:, None], x3[:, None],
                     y0[:, None], y1[:, None], y2[:, None], y3[:, None], USE_ASM)


@triton.jit
def _epilogue_row(acc, out_ptr, ws_ptr, cnt_ptr, bias_ptr, pid_m, offs_n, N, stride_om, stride_os,
                  HAS_BIAS: tl.constexpr, SPLIT_MODE: tl.constexpr, SPLIT: tl.constexpr):
    """:func:`_epilogue` for one token row with a compile-time split count: the last split of a
    tile reads the partials 4 splits at a time (4 loads in flight per element instead of a
    dependent chain of SPLIT loads), still summed in split order."""
    n_mask = offs_n < N
    rel = pid_m * stride_om + offs_n
    if SPLIT_MODE == 0:
        _finish(acc[None, :], out_ptr, bias_ptr, rel[None, :], n_mask[None, :], offs_n, n_mask, False,
                HAS_BIAS)
    else:
        tl.store(ws_ptr + tl.program_id(2) * stride_os + rel, acc, mask=n_mask)
        if SPLIT_MODE == 2:
            tile = tl.program_id(1) * tl.num_programs(0) + tl.program_id(0)
            tl.debug_barrier()
            arrived = tl.atomic_add(cnt_ptr + tile, 1, sem="acq_rel")
            if arrived == SPLIT - 1:
                total = tl.zeros_like(acc)
                for c in range(0, SPLIT, 4):  # a loop, not unrolled: 4 loads live, not SPLIT
                    sk = c + tl.arange(0, 4)
                    parts = tl.load(ws_ptr + sk[:, None] * stride_os + rel[None, :], other=0.0,
                                    mask=(sk[:, None] < SPLIT) & n_mask[None, :], cache_modifier=".cg")
                    total += tl.sum(parts, axis=0)
                _finish(total[None, :], out_ptr, bias_ptr, rel[None, :], n_mask[None, :], offs_n, n_mask,
                        False, HAS_BIAS)
                tl.atomic_xchg(cnt_ptr + tile, 0)


@triton.jit
def _kmajor_block(w_base, x_base, kb, stride_wc, WORDS: tl.constexpr):
    """K-block ``kb``'s weight words [WORDS, BLOCK_N] and its 4 activation-pair words per K-word
    (L1 hits after the first warp)."""
    xp = x_base + kb * WORDS * 4
    return (tl.load(w_base + kb * WORDS * stride_wc), tl.load(xp), tl.load(xp + 1), tl.load(xp + 2),
            tl.load(xp + 3))


@triton.jit(do_not_specialize=["M", "k_blocks_per_split"])
def w4a16_f16x2_gemv_kernel(x_ptr, w_ptr, s_ptr, bias_ptr, out_ptr, ws_ptr, cnt_ptr,
                            M, N, K, stride_xm, stride_wc, stride_sg, stride_om, stride_os,
                            k_blocks_per_split, GROUP: tl.constexpr, BLOCK_N: tl.constexpr,
                            BLOCK_K: tl.constexpr, HAS_BIAS: tl.constexpr, SPLIT_MODE: tl.constexpr,
                            EVEN_N: tl.constexpr, USE_ASM: tl.constexpr, SPLIT: tl.constexpr,
                            PREFETCH: tl.constexpr):
    """W4A16 GEMV, one token row per program: x (M, K) bf16 read as int32 pairs (``stride_xm`` in
    pairs) · K-major int4 words (K/8, N) with bf16 group scales (K/GROUP, N); BLOCK_K divides GROUP.
    Grid (N tiles, M, SPLIT K splits); split-K partials reduced by :func:`_epilogue_row`.
    ``PREFETCH`` double-buffers in registers: K-block kb + 1 is loaded while kb is computed (Triton
    software-pipelines only loads that feed ``tl.dot``; these stay synchronous otherwise)."""
    pid_m = tl.program_id(1)
    WORDS: tl.constexpr = BLOCK_K // 8
    _, offs_n, ld_n, offs_c, kb0, kb1, _ = _gemv_tile(  # its N-major word pointers go unused
        w_ptr, N, K, stride_wc, k_blocks_per_split, 1, BLOCK_N, BLOCK_K, WORDS, EVEN_N)
    w_base = w_ptr + offs_c[:, None] * stride_wc + ld_n[None, :]
    x_base = x_ptr + pid_m * stride_xm + offs_c * 4
    s_ptrs = s_ptr + ld_n
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    if PREFETCH:
        nu, n0, n1, n2, n3 = _kmajor_block(w_base, x_base, kb0, stride_wc, WORDS)
    for kb in range(kb0, kb1):
        if PREFETCH:  # the next K-block's loads go out before this block's arithmetic
            u, w0, w1, w2, w3 = nu, n0, n1, n2, n3
            nu, n0, n1, n2, n3 = _kmajor_block(w_base, x_base, tl.minimum(kb + 1, kb1 - 1), stride_wc, WORDS)
        else:
            u, w0, w1, w2, w3 = _kmajor_block(w_base, x_base, kb, stride_wc, WORDS)
        part = _q4x8_dot_words(u, w0, w1, w2, w3, False, USE_ASM)
        s = tl.load(s_ptrs + (kb * BLOCK_K // GROUP) * stride_sg).to(tl.float32)
        acc += tl.sum(part, axis=0) * s
    _epilogue_row(16.0 * acc, out_ptr, ws_ptr, cnt_ptr, bias_ptr, pid_m, offs_n, N, stride_om, stride_os,
                  HAS_BIAS, SPLIT_MODE, SPLIT)
