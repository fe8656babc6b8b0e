"""The fused one-token trunk with its weights streamed through shared memory by TMA (Gluon, sm_90+).

The same forward, phases, work split and packed buffers as :mod:`daptq_ros.gpu._triton_fused`
(read its docstring first); what differs is how the weights reach the registers. There, each
program's cells go through a register ring of two cells, so at most 64 KB per SM are in flight
and the stream stops while a program waits at a grid barrier or builds its next GEMV input.
Here each program issues its whole sequence of cells — every GEMV's share, one after another —
as TMA bulk copies into a ring of ``STAGES`` shared-memory slots (34 KB each: one cell's int4
words and its scale pair row), one mbarrier per slot. A slot is refilled with the cell ``STAGES``
further on as soon as every warp has read it, whatever GEMV that cell belongs to, so the copies
keep running through barriers and prologues: by the time a GEMV starts, its first ``STAGES``
cells are (being) loaded. The registers hold only the cell being computed. With ``WS`` one
extra producer warp (``gl.warp_specialize``) issues the copies and the compute warps signal each
slot's "empty" mbarrier; otherwise the compute warps refill the slot themselves.

Weight reads in flight while a program waits at a grid barrier make the barrier slower (the
ninth run measured it), so with ``GATE`` the producer issues only a GEMV's first ``GATE`` copies
before its program has passed the barrier in front of that GEMV — with ``GATE_LATE``, before the
GEMV's prologue is done: the compute warps arrive once per phase on a ``passed`` mbarrier, and
the producer waits for the matching phase. The gate only changes how far the copies run ahead,
never which data a slot holds (the slot mbarriers do that), so it cannot change the result.
The small constants every phase reads (copy list, GEMV table, γ, β, biases) are loaded with the
``evict_last`` L2 policy (``EVICT``), so the 160 MB weight stream does not evict them between
launches, and each prologue issues all its loads before its first reduction (``ONE_RT``).

The host passes each program's copy list (:func:`daptq_ros.gpu.fused.tma_copy_list`): the TMA
row of every cell's words and of its scale pair row, in the order the program consumes them.
Each prologue writes the GEMV input into shared memory (one row of packed words per K-group,
laid out so that a thread reads its K-words' activations with one load each). Grid barriers and
atomics are the Triton kernel's, written with explicit layouts. GPU only: Gluon has no CPU
interpreter, so the CPU tests compile it for sm_90 and check its copy lists; its output is
checked on the GPU (the tuner and the benchmarks compare every config with float32).
"""

from __future__ import annotations

from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import fence_async_shared, mbarrier, tma

from daptq_ros.gpu._triton_fused import (
    LOAD_ACQUIRE_BY_THREAD0_ASM,
    META_BIAS,
    META_N,
    META_STRIDE,
    _cell_range,
    _load_affine,
    _load_pairs,
    _pack_f16x2,
    _q4x32_dot_asm,
    _spans_few_groups,
    _step_group,
)

_DOT_ASM = gl.constexpr(_q4x32_dot_asm())
# A CTA-wide (in a warp-specialized region: partition-wide) barrier; renamed after Triton 3.6.
_cta_barrier = gl.thread_barrier if hasattr(gl, "thread_barrier") else gl.barrier
# A TMA copy global → shared completing on an mbarrier (``async_load`` after Triton 3.6).
_tma_load = tma.async_load if hasattr(tma, "async_load") else tma.async_copy_global_to_shared


@gluon.jit
def _reinterpret(smem, dtype: gl.constexpr, shape: gl.constexpr, layout: gl.constexpr):
    """The shared-memory view ``smem`` as another dtype, shape and layout (renamed after 3.6)."""
    if hasattr(smem, "reinterpret"):
        return smem.reinterpret(dtype, shape, layout)
    else:
        return smem._reinterpret(dtype, shape, layout)


@gluon.jit
def _copy_rows(stream_ptr, n_stream, k, EVICT: gl.constexpr):
    """The TMA rows (words, scale pair) of the program's ``k``-th copy (clamped into its list)."""
    kk = gl.maximum(gl.minimum(k, n_stream - 1), 0)
    return (gl.load(stream_ptr + 2 * kk, eviction_policy=EVICT),
            gl.load(stream_ptr + 2 * kk + 1, eviction_policy=EVICT))


@gluon.jit
def _issue(ring, rows, n_stream, k, STAGES: gl.constexpr, CELL_BYTES: gl.constexpr):
    """TMA copies of the program's ``k``-th cell (words and scale pair row; ``rows`` from
    :func:`_copy_rows`) into slot k % STAGES, completing on that slot's mbarrier; nothing past the
    end of the copy list."""
    w_desc, s_desc, ring_w, ring_s, bars, _ = ring
    live = k < n_stream
    slot = k % STAGES
    bar = bars.index(slot)
    mbarrier.expect(bar, CELL_BYTES, pred=live)
    _tma_load(w_desc, [rows[0], 0], bar, ring_w.index(slot), pred=live)
    _tma_load(s_desc, [rows[1], 0], bar, ring_s.index(slot), pred=live)


@gluon.jit
def _fill(ring, rows, n_stream, k, STAGES: gl.constexpr, CELL_BYTES: gl.constexpr):
    """Once the consumers have signalled slot k % STAGES empty, its copy ``k`` (:func:`_issue`)."""
    mbarrier.wait(ring[5].index(k % STAGES), ((k // STAGES) & 1) ^ 1)
    _issue(ring, rows, n_stream, k, STAGES, CELL_BYTES)


@gluon.jit
def _producer(ring, passed, meta_ptr, n_gemv, stream_ptr, n_stream, STAGES: gl.constexpr,
              CELL_BYTES: gl.constexpr, AHEAD: gl.constexpr, EVICT: gl.constexpr, GATE: gl.constexpr):
    """The producer warp (``WS``): every copy of the program's list, each into its slot once the
    consumers have signalled it empty (mbarriers start with phase 1 complete: the first round
    does not wait). With ``AHEAD`` the next copy's rows are loaded before the wait, so a freed
    slot's copy is issued without a round trip to the copy list. With ``GATE`` > 0 (and ``AHEAD``)
    only the first ``GATE`` copies of a GEMV are issued before the program has passed the grid
    barrier that precedes it (the consumers signal ``passed`` once per barrier), so fewer weight
    reads are in flight while it waits there. The wait is by parity: the slots keep the consumers
    at most one phase ahead, and at most one behind unless the program has no cells in a GEMV —
    then a gate may open early. Either way only the copies' timing changes, never a slot's data,
    and every wait needs only GEMVs already issued (no deadlock)."""
    r0, r1 = _copy_rows(stream_ptr, n_stream, 0, EVICT)
    if GATE > 0:
        pid = gl.program_id(0)
        n_prog = gl.num_programs(0)
        k = 0
        for j in range(n_gemv):
            _, c0, c1 = _cell_range(meta_ptr, j, pid, n_prog, EVICT)
            for i in range(c1 - c0):
                n0, n1 = _copy_rows(stream_ptr, n_stream, k + 1, EVICT)
                if (j > 0) & (i >= GATE):  # barrier j - 1 is the program's (j - 1)-th "passed" phase
                    mbarrier.wait(passed, (j - 1) & 1)
                _fill(ring, (r0, r1), n_stream, k, STAGES, CELL_BYTES)
                r0 = n0
                r1 = n1
                k += 1
    else:
        _producer_flat(ring, stream_ptr, n_stream, r0, r1, STAGES, CELL_BYTES, AHEAD, EVICT)


@gluon.jit
def _producer_flat(ring, stream_ptr, n_stream, r0, r1, STAGES: gl.constexpr, CELL_BYTES: gl.constexpr,
                   AHEAD: gl.constexpr, EVICT: gl.constexpr):
    """:func:`_producer` without the gate: the copies in list order, each once its slot is empty."""
    for k in range(n_stream):
        if AHEAD:
            n0, n1 = _copy_rows(stream_ptr, n_stream, k + 1, EVICT)
            _fill(ring, (r0, r1), n_stream, k, STAGES, CELL_BYTES)
            r0 = n0
            r1 = n1
        else:  # the rows are loaded after the wait (the ablation of AHEAD)
            mbarrier.wait(ring[5].index(k % STAGES), ((k // STAGES) & 1) ^ 1)
            _issue(ring, _copy_rows(stream_ptr, n_stream, k, EVICT), n_stream, k, STAGES, CELL_BYTES)


@gluon.jit
def _act_words(act_s, row, ROWL: gl.constexpr):
    """The 16 packed activation words of one group the thread's four K-words (i·Q + r, i < 4, its
    row r) need, 4 per K-word, from row ``row`` of the shared activation buffer
    (:func:`_store_act`: the words of K-word i·Q + r, pair j at [16·row + 4i + j, r])."""
    b = row * 16
    return (act_s.index(b).load(ROWL), act_s.index(b + 1).load(ROWL), act_s.index(b + 2).load(ROWL),
            act_s.index(b + 3).load(ROWL), act_s.index(b + 4).load(ROWL), act_s.index(b + 5).load(ROWL),
            act_s.index(b + 6).load(ROWL), act_s.index(b + 7).load(ROWL), act_s.index(b + 8).load(ROWL),
            act_s.index(b + 9).load(ROWL), act_s.index(b + 10).load(ROWL), act_s.index(b + 11).load(ROWL),
            act_s.index(b + 12).load(ROWL), act_s.index(b + 13).load(ROWL), act_s.index(b + 14).load(ROWL),
            act_s.index(b + 15).load(ROWL))


@gluon.jit
def _store_act(act_s, packed, GROUP: gl.constexpr):
    """Packed words of whole groups (pair order: group, K-word i·Q + r, pair j) → the shared
    activation buffer, 16 rows of Q per group, as [16·group + 4i + j, r] (:func:`_act_words` reads
    a thread's r with one load per (i, j))."""
    BLOCK: gl.constexpr = packed.shape[0]
    Q: gl.constexpr = GROUP // 32
    R: gl.constexpr = BLOCK // (GROUP // 2)
    t = gl.permute(gl.reshape(packed, [R, 4, Q, 4]), [0, 1, 3, 2])
    ROWS: gl.constexpr = act_s.shape[0]
    view = _reinterpret(act_s, gl.int32, [ROWS, Q], gl.SwizzledSharedLayout(1, 1, 1, [1, 0]))
    view.slice(0, R * 16).store(gl.reshape(t, [R * 16, Q]))


@gluon.jit
def _dot(w0, w1, w2, w3, x):
    """Σ q·x/16 over four K-words per column (the Triton kernel's ``_q4x32_dot``)."""
    return gl.inline_asm_elementwise(
        _DOT_ASM, "=f" + ",r" * 20,
        [w0, w1, w2, w3, x[0][:, None], x[1][:, None], x[2][:, None], x[3][:, None],
         x[4][:, None], x[5][:, None], x[6][:, None], x[7][:, None], x[8][:, None], x[9][:, None],
         x[10][:, None], x[11][:, None], x[12][:, None], x[13][:, None], x[14][:, None], x[15][:, None]],
        dtype=gl.float32, is_pure=True, pack=1)


@gluon.jit
def _gemv_phase(ring, stream_ptr, n_stream, k, meta_ptr, vec_ptr, act_s, out_ptr, j, pid, n_prog,
                GROUP: gl.constexpr, BLOCK_N: gl.constexpr, HAS_BIAS: gl.constexpr, STAGES: gl.constexpr,
                CELL_BYTES: gl.constexpr, LW: gl.constexpr, WS: gl.constexpr, BLOCK_S: gl.constexpr,
                EVICT: gl.constexpr):
    """out[n] += Σ_k W_j[n, k] · act[k] over this program's cells of GEMV ``j``, consuming copies
    ``k``, ``k`` + 1, … of the ring. Once read, a slot is refilled with the copy ``STAGES`` on —
    here, or (``WS``) by the producer warp, which this signals on the slot's "empty" mbarrier.
    The input is the prologue's shared buffer: row c - c0 for a run of groups (the cells span
    fewer groups than the row, as the prologue decided), else row g of the whole row. Returns the
    next copy index."""
    GW: gl.constexpr = GROUP // 8
    Q: gl.constexpr = GW // 4
    ROWL: gl.constexpr = gl.SliceLayout(1, LW)
    COLL: gl.constexpr = gl.SliceLayout(0, LW)
    PLAIN2: gl.constexpr = gl.SwizzledSharedLayout(1, 1, 1, [1, 0])
    PLAIN1: gl.constexpr = gl.SwizzledSharedLayout(1, 1, 1, [0])
    _, _, ring_w, ring_s, bars, empty = ring
    n_groups, c0, c1 = _cell_range(meta_ptr, j, pid, n_prog, EVICT)
    row = meta_ptr + j * META_STRIDE
    n_out = gl.load(row + META_N, eviction_policy=EVICT).to(gl.int32)
    b_base = vec_ptr + gl.load(row + META_BIAS, eviction_policy=EVICT)
    t = c0 // n_groups
    g = c0 - t * n_groups
    few = _spans_few_groups(c0, c1, n_groups, GROUP // 2, BLOCK_S)  # as the prologue decided
    offs_n = gl.arange(0, BLOCK_N, layout=COLL)
    acc = gl.zeros([Q, BLOCK_N], gl.float32, LW)
    extra = gl.zeros([BLOCK_N], gl.float32, COLL)
    for c in range(c0, c1):
        if not WS:
            refill = _copy_rows(stream_ptr, n_stream, k + STAGES, EVICT)  # (loads issued before the wait)
        x = _act_words(act_s, gl.where(few, c - c0, g), ROWL)
        slot = k % STAGES
        mbarrier.wait(bars.index(slot), (k // STAGES) & 1)
        cell = _reinterpret(ring_w.index(slot), gl.int32, [GW, BLOCK_N], PLAIN2)
        w0 = cell.slice(0, Q).load(LW)
        w1 = cell.slice(Q, Q).load(LW)
        w2 = cell.slice(2 * Q, Q).load(LW)
        w3 = cell.slice(3 * Q, Q).load(LW)
        sw = _reinterpret(ring_s.index(slot), gl.int32, [BLOCK_N], PLAIN1).load(COLL)
        if WS:
            fence_async_shared()  # the reads are ordered before the producer's next TMA write
            mbarrier.arrive(empty.index(slot), count=1)
        else:
            _cta_barrier()  # every warp has read the slot: refill it
            _issue(ring, refill, n_stream, k + STAGES, STAGES, CELL_BYTES)
        # the cell's scales (as _triton_fused._scale_of; calling it changes the sm_90 schedule)
        bits = gl.where((g % 2) == 0, sw << 16, sw & -65536)
        acc += _dot(w0, w1, w2, w3, x) * bits.to(gl.float32, bitcast=True)[None, :]
        if HAS_BIAS:
            if g == 0:  # the range holding a tile's first group adds its bias, exactly once
                extra += gl.load(b_base + t * BLOCK_N + offs_n, eviction_policy=EVICT)
        if (g == n_groups - 1) | (c == c1 - 1):
            rows = t * BLOCK_N + offs_n
            gl.atomic_add(out_ptr + rows, 16.0 * gl.sum(acc, axis=0) + extra, mask=rows < n_out,
                          sem="relaxed")
            acc = gl.zeros([Q, BLOCK_N], gl.float32, LW)
            extra = gl.zeros([BLOCK_N], gl.float32, COLL)
        g, t = _step_group(g, t, n_groups)
        k += 1
    return k


@gluon.jit
def _add_pairs(a, b, c, d):
    return a + c, b + d


@gluon.jit
def _pair_stats(e, o, mask, n, eps):
    """Mean and 1/σ (fp32) of a row held as its even and odd elements: Σx and Σx² in one
    reduction (one cross-warp round instead of two dependent ones; masked elements are 0)."""
    s1, s2 = gl.reduce((e + o, e * e + o * o), 0, _add_pairs)
    mean = s1 / n
    return mean, 1.0 / gl.sqrt(gl.maximum(s2 / n - mean * mean, 0.0) + eps)


@gluon.jit
def _own_groups(meta_ptr, j, pid, n_prog, n, GROUP: gl.constexpr, BLOCK_S: gl.constexpr,
                L1: gl.constexpr, EVICT: gl.constexpr):
    """Whether this program's cells of GEMV ``j`` span fewer K-groups than the row (and fit
    ``BLOCK_S`` pairs), and those groups' pair indices and mask (a run that may wrap)."""
    n_groups, c0, c1 = _cell_range(meta_ptr, j, pid, n_prog, EVICT)
    HALF: gl.constexpr = GROUP // 2
    i = gl.arange(0, BLOCK_S, layout=L1)
    few = _spans_few_groups(c0, c1, n_groups, HALF, BLOCK_S)
    return few, ((c0 % n_groups) * HALF + i) % (n // 2), i < (c1 - c0) * HALF


@gluon.jit
def _normalize_store(e, o, mean, rstd, affine, act_s, GROUP: gl.constexpr):
    """(x - mean)·rstd·γ + β of the given pairs (``affine`` from ``_load_affine``) → packed words
    in the shared buffer."""
    ge, go, be, bo = affine
    _store_act(act_s, _pack_f16x2((e - mean) * rstd * ge + be, (o - mean) * rstd * go + bo), GROUP)


@gluon.jit
def _prologue_ln(src_ptr, gamma_ptr, beta_ptr, act_s, n, eps, meta_ptr, j, pid, n_prog, GROUP: gl.constexpr,
                 SRC_BF16: gl.constexpr, BLOCK_P: gl.constexpr, BLOCK_S: gl.constexpr, L1: gl.constexpr,
                 ONE_RT: gl.constexpr, EVICT: gl.constexpr):
    """LayerNorm(src)·γ + β of this program's own K-groups (all of them when its cells span the
    row) → its packed activation words; the statistics come from the whole row. With ``ONE_RT``
    γ and β are loaded with the row, before the reduction (one round trip instead of two)."""
    pairs = gl.arange(0, BLOCK_P, layout=L1)
    mask = pairs < n // 2
    few, mine, m = _own_groups(meta_ptr, j, pid, n_prog, n, GROUP, BLOCK_S, L1, EVICT)
    if few:
        if ONE_RT:
            affine = _load_affine(gamma_ptr, beta_ptr, mine, m, EVICT)
        me, mo = _load_pairs(src_ptr, mine, m, SRC_BF16)
        e, o = _load_pairs(src_ptr, pairs, mask, SRC_BF16)
        mean, rstd = _pair_stats(e, o, mask, n, eps)
        if not ONE_RT:
            affine = _load_affine(gamma_ptr, beta_ptr, mine, m, EVICT)
        _normalize_store(me, mo, mean, rstd, affine, act_s, GROUP)
    else:
        _ln_row(src_ptr, gamma_ptr, beta_ptr, act_s, n, eps, pairs, mask, GROUP, SRC_BF16, ONE_RT, EVICT)


@gluon.jit
def _ln_row(src_ptr, gamma_ptr, beta_ptr, act_s, n, eps, pairs, mask, GROUP: gl.constexpr,
            SRC_BF16: gl.constexpr, ONE_RT: gl.constexpr, EVICT: gl.constexpr):
    """LayerNorm(src)·γ + β of the whole row → the shared activation buffer."""
    if ONE_RT:
        affine = _load_affine(gamma_ptr, beta_ptr, pairs, mask, EVICT)
    e, o = _load_pairs(src_ptr, pairs, mask, SRC_BF16)
    mean, rstd = _pair_stats(e, o, mask, n, eps)
    if not ONE_RT:
        affine = _load_affine(gamma_ptr, beta_ptr, pairs, mask, EVICT)
    _normalize_store(e, o, mean, rstd, affine, act_s, GROUP)


@gluon.jit
def _pointwise_pairs(src_ptr, act_s, pairs, mask, GELU: gl.constexpr, GROUP: gl.constexpr):
    e, o = _load_pairs(src_ptr, pairs, mask, False)
    if GELU:  # x·σ(2·√(2/π)(x + 0.044715x³)), as _triton_fused._gelu_tanh (its tl.sigmoid compiles
        # to other instructions)
        e = e / (1.0 + gl.exp(-1.5957691216057308 * (e + 0.044715 * e * e * e)))
        o = o / (1.0 + gl.exp(-1.5957691216057308 * (o + 0.044715 * o * o * o)))
    _store_act(act_s, _pack_f16x2(e, o), GROUP)


@gluon.jit
def _prologue_pointwise(src_ptr, act_s, n, meta_ptr, j, pid, n_prog, GROUP: gl.constexpr,
                        GELU: gl.constexpr, BLOCK_P: gl.constexpr, BLOCK_S: gl.constexpr, L1: gl.constexpr,
                        EVICT: gl.constexpr):
    """src (fp32), through tanh-GELU when ``GELU``, → this program's own packed activation words."""
    few, mine, m = _own_groups(meta_ptr, j, pid, n_prog, n, GROUP, BLOCK_S, L1, EVICT)
    if few:
        _pointwise_pairs(src_ptr, act_s, mine, m, GELU, GROUP)
    else:
        pairs = gl.arange(0, BLOCK_P, layout=L1)
        _pointwise_pairs(src_ptr, act_s, pairs, pairs < n // 2, GELU, GROUP)


@gluon.jit
def _slice_offsets(n, pid, n_prog, start, SLICE: gl.constexpr, L1: gl.constexpr):
    """Offsets and mask of chunk ``start`` of this program's share of [0, n)."""
    per = (n + n_prog - 1) // n_prog
    offs = pid * per + start + gl.arange(0, SLICE, layout=L1)
    return offs, (offs < n) & (offs < (pid + 1) * per)


@gluon.jit
def _zero_slice(ptr, n, pid, n_prog, SLICE: gl.constexpr, L1: gl.constexpr):
    """Zero this program's share of ptr[0:n]."""
    for start in range(0, (n + n_prog - 1) // n_prog, SLICE):
        offs, mask = _slice_offsets(n, pid, n_prog, start, SLICE, L1)
        gl.store(ptr + offs, gl.zeros([SLICE], gl.float32, L1), mask=mask)


@gluon.jit
def _copy_slice(src_ptr, dst_ptr, n, pid, n_prog, SLICE: gl.constexpr, L1: gl.constexpr):
    """dst[share] = src[share] (bf16 → fp32): the input token becomes the residual."""
    for start in range(0, (n + n_prog - 1) // n_prog, SLICE):
        offs, mask = _slice_offsets(n, pid, n_prog, start, SLICE, L1)
        gl.store(dst_ptr + offs, gl.load(src_ptr + offs, mask=mask).to(gl.float32), mask=mask)


@gluon.jit
def _final_norm(res_ptr, gamma_ptr, beta_ptr, out_ptr, n, eps, pid, n_prog, BLOCK_P: gl.constexpr,
                SLICE: gl.constexpr, L1: gl.constexpr, ONE_RT: gl.constexpr, EVICT: gl.constexpr):
    """Final LayerNorm of the residual → this program's slice of the bf16 output (with ``ONE_RT``
    the slice, γ and β are loaded with the row, before the reduction)."""
    pairs = gl.arange(0, BLOCK_P, layout=L1)
    mask = pairs < n // 2
    offs, m = _slice_offsets(n, pid, n_prog, 0, SLICE, L1)
    if ONE_RT:
        v, ga, be = _slice_affine(res_ptr, gamma_ptr, beta_ptr, offs, m, EVICT)
    e, o = _load_pairs(res_ptr, pairs, mask, False)
    mean, rstd = _pair_stats(e, o, mask, n, eps)
    if not ONE_RT:
        v, ga, be = _slice_affine(res_ptr, gamma_ptr, beta_ptr, offs, m, EVICT)
    gl.store(out_ptr + offs, ((v - mean) * rstd * ga + be).to(gl.bfloat16), mask=m)


@gluon.jit
def _slice_affine(res_ptr, gamma_ptr, beta_ptr, offs, m, EVICT: gl.constexpr):
    """The residual, γ and β at ``offs``."""
    return (gl.load(res_ptr + offs, mask=m, other=0.0, cache_modifier=".cg"),
            gl.load(gamma_ptr + offs, mask=m, eviction_policy=EVICT),
            gl.load(beta_ptr + offs, mask=m, eviction_policy=EVICT))


@gluon.jit
def _load_acquire(ptr, THREADS: gl.constexpr, L1: gl.constexpr):
    """``ld.acquire.gpu`` of one int32 by thread 0, shared with every thread (a max-reduction;
    the others contribute 0). Measured: relaxed polls with one ``fence.acq_rel.gpu`` per thread
    at the end made the barrier waits longer (docs/gpu_bench.md, eighth run)."""
    idx = gl.arange(0, THREADS, layout=L1)
    v = gl.inline_asm_elementwise(LOAD_ACQUIRE_BY_THREAD0_ASM, "=r,l,r", [ptr + 0 * idx, idx], dtype=gl.int32,
                                  is_pure=False, pack=1)
    return gl.max(v, axis=0)


@gluon.jit
def _await(bar_ptr, err_ptr, target, MAX_SPIN: gl.constexpr, THREADS: gl.constexpr, L1: gl.constexpr):
    """Poll the grid barrier's counter until ``target`` programs have arrived (error flag past
    ``MAX_SPIN`` polls: a grid that is not co-resident). (Measured: one thread polling in a loop of
    its own, sharing the result once, was no faster; docs/gpu_bench.md, ninth run.)"""
    seen = _load_acquire(bar_ptr, THREADS, L1)
    spins = 0
    while (seen < target) & (spins < MAX_SPIN):
        seen = _load_acquire(bar_ptr, THREADS, L1)
        spins += 1
    if seen < target:
        gl.atomic_max(err_ptr, 1, sem="relaxed", scope="gpu")
    _cta_barrier()


@gluon.jit
def _stamp(trace_ptr, idx, TRACE: gl.constexpr, L1: gl.constexpr):
    """With ``TRACE``: ``%globaltimer`` (ns) → trace[idx], once every thread got here."""
    if TRACE:
        _cta_barrier()
        t = gl.inline_asm_elementwise("mov.u64 $0, %globaltimer;", "=l,r", [gl.zeros([1], gl.int32, L1)],
                                      dtype=gl.int64, is_pure=False, pack=1)
        gl.store(trace_ptr + idx + gl.arange(0, 1, layout=L1), t)


@gluon.jit
def gluon_trunk_kernel(x_ptr, out_ptr, w_desc, s_desc, vec_ptr, meta_ptr, stream_ptr, n_stream_ptr, res_ptr,
                       qkv_ptr, f_ptr, bar_ptr, err_ptr, trace_ptr, n_layers, eps,
                       D: gl.constexpr, FFN: gl.constexpr, GROUP: gl.constexpr, BLOCK_N: gl.constexpr,
                       BLOCK_PD: gl.constexpr, BLOCK_PF: gl.constexpr, BLOCK_S: gl.constexpr,
                       SLICE: gl.constexpr, STREAM_STRIDE: gl.constexpr,
                       HAS_BIAS: gl.constexpr, MAX_SPIN: gl.constexpr, TRACE: gl.constexpr,
                       STAGES: gl.constexpr, THREADS: gl.constexpr, TMA_W: gl.constexpr, WS: gl.constexpr,
                       ONE_RT: gl.constexpr, AHEAD: gl.constexpr, EVICT: gl.constexpr, GATE: gl.constexpr,
                       GATE_LATE: gl.constexpr):
    """The whole one-token forward (module docstring), one persistent program per SM.

    ``WS``: one extra producer warp issues the copies (``gl.warp_specialize``); the ``THREADS``
    threads of the default partition only consume them. Otherwise the same threads do both.
    ``ONE_RT``: every prologue issues all its loads before its first reduction. ``AHEAD``: the
    producer loads each copy's rows before waiting for its slot. ``EVICT``: the L2 eviction
    policy of the small constant loads (copy list, GEMV table, γ/β, biases), e.g. ``"evict_last"``
    so that the weight stream does not evict them between launches.
    With ``TRACE`` every program writes four ``%globaltimer`` stamps per phase, as the Triton
    kernel does: phase start, prologue done, GEMV done, barrier passed."""
    # TMA views: the words and scale pairs as rows of TMA_W int32, a cell's words W_ROWS rows
    W_ROWS: gl.constexpr = (GROUP // 8) * BLOCK_N // TMA_W
    S_ROWS: gl.constexpr = BLOCK_N // TMA_W
    ring_w = gl.allocate_shared_memory(gl.int32, [STAGES, W_ROWS, TMA_W], w_desc.layout)
    ring_s = gl.allocate_shared_memory(gl.int32, [STAGES, S_ROWS, TMA_W], s_desc.layout)
    bars = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    passed = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())  # grid barriers passed
    for i in gl.static_range(STAGES):
        mbarrier.init(bars.index(i), count=1)
        mbarrier.init(empty.index(i), count=1)
    mbarrier.init(passed, count=1)
    _cta_barrier()
    ring = (w_desc, s_desc, ring_w, ring_s, bars, empty)
    pid = gl.program_id(0)
    my_stream = stream_ptr + pid * STREAM_STRIDE
    n_stream = gl.load(n_stream_ptr + pid)
    # the GEMV input, built by each prologue: one row of GROUP/2 packed words per K-group
    ACT_ROWS: gl.constexpr = max(BLOCK_PF, BLOCK_PD, BLOCK_S) // (GROUP // 2)
    act_s = gl.allocate_shared_memory(gl.int32, [ACT_ROWS * 16, GROUP // 32],
                                      gl.SwizzledSharedLayout(1, 1, 1, [0]))
    body = (x_ptr, out_ptr, vec_ptr, meta_ptr, res_ptr, qkv_ptr, f_ptr, act_s, bar_ptr, err_ptr, trace_ptr,
            n_layers, eps, ring, my_stream, n_stream, passed)
    if WS:
        gl.warp_specialize([(_trunk_body, (body, D, FFN, GROUP, BLOCK_N, BLOCK_PD, BLOCK_PF, BLOCK_S, SLICE,
                                           HAS_BIAS, MAX_SPIN, TRACE, STAGES, THREADS, WS, ONE_RT, EVICT,
                                           GATE, GATE_LATE)),
                            (_producer, (ring, passed, meta_ptr, 4 * n_layers, my_stream, n_stream, STAGES,
                                         (GROUP // 8) * BLOCK_N * 4 + BLOCK_N * 4, AHEAD, EVICT, GATE))],
                           [1], [24])
    else:
        _trunk_body(body, D, FFN, GROUP, BLOCK_N, BLOCK_PD, BLOCK_PF, BLOCK_S, SLICE, HAS_BIAS, MAX_SPIN,
                    TRACE, STAGES, THREADS, WS, ONE_RT, EVICT, GATE, GATE_LATE)
    for i in gl.static_range(STAGES):
        mbarrier.invalidate(bars.index(i))
        mbarrier.invalidate(empty.index(i))
    mbarrier.invalidate(passed)
    n_prog = gl.num_programs(0)
    _cta_barrier()  # the last program out resets the counters for the next launch
    if gl.atomic_add(bar_ptr + 1, 1, sem="acq_rel", scope="gpu") == n_prog - 1:
        gl.atomic_xchg(bar_ptr, 0, sem="relaxed", scope="gpu")
        gl.atomic_xchg(bar_ptr + 1, 0, sem="relaxed", scope="gpu")


@gluon.jit
def _trunk_body(body, D: gl.constexpr, FFN: gl.constexpr, GROUP: gl.constexpr, BLOCK_N: gl.constexpr,
                BLOCK_PD: gl.constexpr, BLOCK_PF: gl.constexpr, BLOCK_S: gl.constexpr, SLICE: gl.constexpr,
                HAS_BIAS: gl.constexpr, MAX_SPIN: gl.constexpr, TRACE: gl.constexpr,
                STAGES: gl.constexpr, THREADS: gl.constexpr, WS: gl.constexpr, ONE_RT: gl.constexpr,
                EVICT: gl.constexpr, GATE: gl.constexpr, GATE_LATE: gl.constexpr):
    """The phases: prologues, GEMVs (consuming the ring), grid barriers."""
    (x_ptr, out_ptr, vec_ptr, meta_ptr, res_ptr, qkv_ptr, f_ptr, act_s, bar_ptr, err_ptr, trace_ptr,
     n_layers, eps, ring, my_stream, n_stream, passed) = body
    WARPS: gl.constexpr = THREADS // 32
    L1: gl.constexpr = gl.BlockedLayout([1], [32], [WARPS], [0])
    # a [GROUP/32, BLOCK_N] quarter cell: SPT contiguous columns per lane, 8 lanes along a row,
    # 4 rows; the warps side by side (repeated along the row when they cover less than BLOCK_N)
    SPT: gl.constexpr = max(1, min(4, BLOCK_N // (8 * WARPS)))
    LW: gl.constexpr = gl.BlockedLayout([1, SPT], [4, 8], [1, WARPS], [1, 0])
    CELL_BYTES: gl.constexpr = (GROUP // 8) * BLOCK_N * 4 + BLOCK_N * 4
    pid = gl.program_id(0)
    n_prog = gl.num_programs(0)
    if not WS:  # the first cell now, the rest once the first prologue's loads are done
        _issue(ring, _copy_rows(my_stream, n_stream, 0, EVICT), n_stream, 0, STAGES, CELL_BYTES)
    n_sync = 0
    n_phases = 4 * n_layers + 1
    k = 0
    for ph in range(0, n_phases):
        stamps = (pid * n_phases + ph) * 4
        _stamp(trace_ptr, stamps, TRACE, L1)
        layer = ph // 4
        kind = ph % 4
        ln = vec_ptr + layer * 4 * D
        if layer == n_layers:
            _final_norm(res_ptr, ln, ln + D, out_ptr, D, eps, pid, n_prog, BLOCK_PD, SLICE, L1, ONE_RT, EVICT)
            _stamp(trace_ptr, stamps + 1, TRACE, L1)
            _stamp(trace_ptr, stamps + 2, TRACE, L1)
        else:
            if kind == 0:  # LN1 → QKV; the MLP accumulator is zeroed for this layer's FC1
                if layer == 0:  # the input token becomes the residual (this program's share)
                    if ONE_RT:  # its load issued with the prologue's (SLICE covers a share of D)
                        offs, m = _slice_offsets(D, pid, n_prog, 0, SLICE, L1)
                        x_share = gl.load(x_ptr + offs, mask=m)
                    _prologue_ln(x_ptr, ln, ln + D, act_s, D, eps, meta_ptr, ph, pid, n_prog, GROUP, True,
                                 BLOCK_PD, BLOCK_S, L1, ONE_RT, EVICT)
                    if ONE_RT:
                        gl.store(res_ptr + offs, x_share.to(gl.float32), mask=m)
                    else:
                        _copy_slice(x_ptr, res_ptr, D, pid, n_prog, SLICE, L1)
                else:
                    _prologue_ln(res_ptr, ln, ln + D, act_s, D, eps, meta_ptr, ph, pid, n_prog, GROUP, False,
                                 BLOCK_PD, BLOCK_S, L1, ONE_RT, EVICT)
                _zero_slice(f_ptr, FFN, pid, n_prog, SLICE, L1)
                dst = qkv_ptr
            elif kind == 1:  # attention over one key = v → O, added into the residual
                _prologue_pointwise(qkv_ptr + 2 * D, act_s, D, meta_ptr, ph, pid, n_prog, GROUP, False,
                                    BLOCK_PD, BLOCK_S, L1, EVICT)
                dst = res_ptr
            elif kind == 2:  # LN2 → FC1; the QKV accumulator is zeroed for the next layer
                _prologue_ln(res_ptr, ln + 2 * D, ln + 3 * D, act_s, D, eps, meta_ptr, ph, pid, n_prog, GROUP,
                             False, BLOCK_PD, BLOCK_S, L1, ONE_RT, EVICT)
                _zero_slice(qkv_ptr, 3 * D, pid, n_prog, SLICE, L1)
                dst = f_ptr
            else:  # GELU → FC2, added into the residual
                _prologue_pointwise(f_ptr, act_s, FFN, meta_ptr, ph, pid, n_prog, GROUP, True, BLOCK_PF,
                                    BLOCK_S, L1, EVICT)
                dst = res_ptr
            _cta_barrier()  # the packed input is written before any thread reads it
            if WS and (GATE > 0) and GATE_LATE:
                if ph > 0:  # barrier ph - 1 passed and this prologue's loads done: the rest may stream
                    mbarrier.arrive(passed, count=1)
            if (not WS) and (ph == 0):
                for i in gl.static_range(1, STAGES):
                    _issue(ring, _copy_rows(my_stream, n_stream, i, EVICT), n_stream, i, STAGES, CELL_BYTES)
            _stamp(trace_ptr, stamps + 1, TRACE, L1)
            k = _gemv_phase(ring, my_stream, n_stream, k, meta_ptr, vec_ptr, act_s, dst, ph, pid, n_prog,
                            GROUP, BLOCK_N, HAS_BIAS, STAGES, CELL_BYTES, LW, WS, BLOCK_S, EVICT)
            _stamp(trace_ptr, stamps + 2, TRACE, L1)
            n_sync += 1
            _cta_barrier()
            gl.atomic_add(bar_ptr, 1, sem="release", scope="gpu")
            _await(bar_ptr, err_ptr, n_sync * n_prog, MAX_SPIN, THREADS, L1)
            if WS and (GATE > 0) and (not GATE_LATE):
                mbarrier.arrive(passed, count=1)  # the producer may issue the next GEMV's later copies
        _stamp(trace_ptr, stamps + 3, TRACE, L1)
