"""The fused one-token trunk kernel (daptq_ros.gpu.fused): layout, correctness, errors, the
benchmark wiring, and the sm_90 compile of the persistent kernel (grid barrier, L2 bulk prefetch,
vectorized weight loads). Without a GPU the kernel runs in Triton's interpreter, one launch per
phase; with one (``TRITON_INTERPRET=0``) as the persistent launch."""

from __future__ import annotations

import argparse
import json

import pytest
import torch
from test_gpu_kernels import DEV, compile_report

from daptq_ros.gpu import bench
from daptq_ros.gpu.fused import (
    FusedConfig,
    FusedTrunk,
    FusionUnsupportedError,
    pair_scales,
    tile_kmajor,
    tma_copy_list,
    tma_width,
)
from daptq_ros.gpu.linear import quantize_model, reference_model, weight_nbytes
from daptq_ros.gpu.packing import Int4KMajorWeight, pack_int4_kmajor, relative_error
from daptq_ros.gpu.trunk import TrunkConfig, build_trunk


def _trunk(bias: bool = False, fused_qkv: bool = True, ffn: int = 384, layers: int = 2):
    cfg = TrunkConfig(name="t", d_model=256, n_layers=layers, n_heads=2, ffn=ffn, fused_qkv=fused_qkv,
                      bias=bias)
    return build_trunk(cfg, DEV, std=0.05)


def _f16x2(model):
    q, report = quantize_model(model, "w4a16_f16x2_g128")
    assert not report.kept_float
    return q


def test_tile_kmajor_puts_each_cell_in_one_contiguous_block():
    gen = torch.Generator().manual_seed(0)
    n, k, group, bn = 40, 256, 128, 16  # 40 rows: the last tile is half padding
    q = torch.randint(-8, 8, (n, k), generator=gen, dtype=torch.int8)
    scales = torch.rand(k // group, n, generator=gen).to(torch.bfloat16)
    w = Int4KMajorWeight(pack_int4_kmajor(q), scales, group)
    tw, ts = tile_kmajor(w, bn)
    assert tw.shape == (3, k // 8, bn) and ts.shape == (3, k // group, bn)
    assert tw.is_contiguous() and ts.is_contiguous()
    flat = tw.reshape(-1)
    gw = group // 8
    for t in range(3):
        for g in range(k // group):
            cell = flat[(t * (k // group) + g) * gw * bn:][: gw * bn].reshape(gw, bn)
            cols = slice(t * bn, min((t + 1) * bn, n))
            width = cols.stop - cols.start
            assert torch.equal(cell[:, :width], w.words[g * gw:(g + 1) * gw, cols])
            assert torch.equal(ts[t, g, :width], w.scales[g, cols])
    pad = tw[2, :, 8:]  # rows 40..47: eight zero weights per word (offset binary 8)
    assert torch.equal(Int4KMajorWeight(pad.contiguous(), ts[2, :, 8:].contiguous(), group).unpacked(),
                       torch.zeros(8, k, dtype=torch.int8))
    assert torch.count_nonzero(ts[2, :, 8:]) == 0


@pytest.mark.parametrize("n_groups", [4, 3])
def test_pair_scales_keep_the_bf16_bits_two_groups_per_word(n_groups):
    gen = torch.Generator().manual_seed(3)
    ts = torch.randn(2, n_groups, 16, generator=gen).to(torch.bfloat16)
    words = pair_scales(ts)
    assert words.dtype == torch.int32 and words.shape == (2, (n_groups + 1) // 2, 16)
    as_bf16 = lambda bits: (bits & 0xFFFF).to(torch.int16).view(torch.bfloat16)  # noqa: E731
    for g in range(n_groups):
        half = words[:, g // 2] >> (16 * (g % 2))
        assert torch.equal(as_bf16(half), ts[:, g])
    if n_groups % 2:  # the padding group has zero scales
        assert torch.count_nonzero(words[:, -1] >> 16) == 0


@pytest.mark.parametrize("bias,fused_qkv,block_n,quad,ln_subset",
                         [(False, True, 256, True, False), (True, False, 64, True, True),
                          (False, True, 128, False, True), (True, False, 64, False, False)])
def test_fused_trunk_matches_the_float32_reference(bias, fused_qkv, block_n, quad, ln_subset):
    # ffn = 384 is not a multiple of 256: the padded tile rows must not leak into the output;
    # 3 interpreter programs split every GEMV's cells unevenly, across tile boundaries
    q = _f16x2(_trunk(bias=bias, fused_qkv=fused_qkv))
    fused = FusedTrunk(q, FusedConfig(block_n=block_n, quad=quad, ln_subset=ln_subset))
    ref = fused.reference()
    gen = torch.Generator(device=DEV).manual_seed(1)
    for i in range(2):  # the second call checks that the accumulators were left zeroed
        x = torch.randn(1, 1, 256, generator=gen, device=DEV).to(torch.bfloat16)
        y = fused(x)
        assert y.shape == x.shape and y.dtype == torch.bfloat16
        r = ref(x.float())
        err = relative_error(y.float(), r)
        assert err < 1e-2, (i, err)
        # the per-Linear f16x2 model computes the same function
        assert relative_error(y.float(), q(x).float()) < 1e-2


@pytest.mark.parametrize("ln_subset", [False, True])
def test_many_programs_build_only_their_groups_of_an_input(monkeypatch, ln_subset):
    # 16 interpreter programs: most get at most one or two cells of each GEMV, so their v / GELU
    # prologues (and with ln_subset their LayerNorm prologues) take the subset path (their groups
    # only, wrapping at the row end); the output must not change
    from daptq_ros.gpu import fused as fused_mod

    q = _f16x2(_trunk(bias=True, fused_qkv=False))
    x = torch.randn(1, 1, 256, device=DEV).to(torch.bfloat16)
    few = FusedTrunk(q, FusedConfig(block_n=64))(x).float()
    monkeypatch.setattr(fused_mod, "_INTERPRET_PROGRAMS", 16)
    many = FusedTrunk(q, FusedConfig(block_n=64, ln_subset=ln_subset, early_arrive=ln_subset))
    assert many.n_programs(x.device) == 16
    assert many._subset_pairs(16) == 128  # QKV: 24 cells over 16 programs → ≤ 2 cells × 64 pairs
    y = many(x).float()
    assert relative_error(y, many.reference()(x.float())) < 1e-2
    assert relative_error(y, few) < 1e-3


def test_launch_constants_never_read_device_tensors():
    # a CUDA graph cannot capture a device → host copy: the launch path must use host-side values
    fused = FusedTrunk(_f16x2(_trunk(layers=1)))
    fused._buffers["meta"] = torch.empty(fused.meta.shape, dtype=fused.meta.dtype, device="meta")
    p, consts = fused._launch_args(torch.device("cpu"))
    assert p == 3 and consts["BLOCK_S"] >= 16
    assert fused._launch_args(torch.device("cpu"))[1] is consts  # built once per device


def test_fused_trunk_detects_a_wrong_weight():
    q = _f16x2(_trunk())
    fused = FusedTrunk(q)
    x = torch.randn(1, 1, 256, device=DEV).to(torch.bfloat16)
    good = fused(x).float()
    with torch.no_grad():
        fused.words[: fused.words.numel() // 2] ^= 0x11111111  # one bit of every nibble, half the words
    assert relative_error(fused(x).float(), good) > 5e-2


def test_other_shapes_run_the_per_linear_model():
    q = _f16x2(_trunk())
    fused = FusedTrunk(q)
    x = torch.randn(1, 3, 256, device=DEV).to(torch.bfloat16)
    assert torch.equal(fused(x), q(x))
    with pytest.raises(ValueError, match="last dim 256"):
        fused(torch.zeros(1, 1, 128, dtype=torch.bfloat16, device=DEV))


def test_trace_needs_the_compiled_kernel():
    fused = FusedTrunk(_f16x2(_trunk(layers=1)))
    x = torch.randn(1, 1, 256, device=DEV).to(torch.bfloat16)
    if DEV.type != "cuda":
        with pytest.raises(ValueError, match="globaltimer"):
            fused.trace(x, repeats=1)
    else:  # on a GPU: four stamps per program and phase, in order
        tr = fused.trace(x, repeats=2)
        assert [p["phase"] for p in tr["phases"]] == ["L0 qkv", "L0 o", "L0 fc1", "L0 fc2", "final LN"]
        assert all(p["gemv_med"] >= 0 and p["wait_med"] >= 0 for p in tr["phases"])
        assert tr["total_us"] > 0


def test_fused_bench_config_parser_names_bad_fields():
    from daptq_ros.gpu.fused_bench import parse_config

    assert parse_config("quad=0,block_n=512") == FusedConfig(quad=False, block_n=512)
    assert parse_config("") == FusedConfig()
    assert parse_config("gate=0,gate_late=0,keep_l2=0") == FusedConfig(gate=0, gate_late=False, keep_l2=False)
    # the gate is the producer warp's, and needs the copy rows loaded ahead
    assert FusedConfig().active_gate == 2
    for off in ({"ws": False}, {"ahead": False}, {"tma": False}):
        assert FusedConfig(**off).active_gate == 0
    with pytest.raises(argparse.ArgumentTypeError, match="unknown field 'quadd'"):
        parse_config("quadd=1")
    with pytest.raises(argparse.ArgumentTypeError, match="num_warps must be"):
        parse_config("num_warps=7")
    with pytest.raises(argparse.ArgumentTypeError, match="bad value for block_n"):
        parse_config("block_n=wide")


def test_fused_bench_replots_timelines_from_its_json(tmp_path):
    from daptq_ros.gpu import fused_bench

    phases = [{"phase": name, "start": 10.0 * i, "span": 9.0, "prologue_med": 1.0, "prologue_max": 1.5,
               "gemv_med": 6.0, "gemv_max": 7.0, "wait_med": 2.0, "wait_max": 3.0, "gemv_gbs": 2000.0}
              for i, name in enumerate(["L0 qkv", "L0 o"])]
    phases.append({"phase": "final LN", "start": 20.0, "span": 1.0, "prologue_med": 0.0, "prologue_max": 0.0,
                   "gemv_med": 1.0, "gemv_max": 1.0, "wait_med": 0.0, "wait_max": 0.0})
    trace = {"model": "t", "label": "persistent n256 w8x1 quad", "programs": 132, "repeats": 20,
             "total_us": 21.0, "phases": phases}
    doc = tmp_path / "f.json"
    doc.write_text(json.dumps({"rows": [], "traces": [trace, {"model": "t", "error": "failed"}]}))
    assert fused_bench.main(["--json", str(doc), "--replot"]) == 0
    png = tmp_path / "f_trace0.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (tmp_path / "f_trace1.png").exists()  # the failed trace has no timeline
    assert "| L0 o | 10.0 |" in fused_bench._trace_table("t", "x", trace)


def test_unsupported_models_are_refused_with_the_reason():
    with pytest.raises(FusionUnsupportedError, match="Trunk"):
        FusedTrunk(torch.nn.Linear(4, 4))  # type: ignore[arg-type]
    with pytest.raises(FusionUnsupportedError, match="W4A16F16x2Linear"):
        FusedTrunk(_trunk())  # not quantized
    small = build_trunk(TrunkConfig(name="s", d_model=64, n_layers=1, n_heads=2, ffn=256), DEV)
    with pytest.raises(FusionUnsupportedError, match="one group size"):
        quantize_model(small, "w4a16_fused_g128")  # K = 64 falls back to group 64, fc2 keeps 128


@pytest.mark.parametrize("kwargs,match", [
    ({"block_n": 96}, "block_n"), ({"num_warps": 3}, "num_warps"),
    ({"programs_per_sm": 3}, "programs_per_sm"), ({"l2_ahead": 17}, "l2_ahead"), ({"stages": 1}, "stages"),
    ({"stages": 17}, "stages"), ({"gate": -1}, "gate"), ({"gate": 17}, "gate")])
def test_config_validation_names_the_field(kwargs, match):
    with pytest.raises(ValueError, match=match):
        FusedConfig(**kwargs)


def test_benchmark_wiring_counts_the_weights_once():
    base = _trunk()
    fused, report = quantize_model(base, "w4a16_fused_g128")
    assert isinstance(fused, FusedTrunk) and report.variant == "w4a16_fused_g128" and report.quantized
    f16x2 = fused.inner
    # with tiles dividing every N (block_n 128, ffn 384): the same integers and scales as the
    # per-Linear model, LN vectors in fp32 instead of bf16, the GEMV table, and a zero-scale group
    # per tile where a GEMV has an odd group count (FC2: K 384 = 3 groups; scales go in pairs);
    # the inner model's buffers are not counted twice
    unpadded = FusedTrunk(f16x2, FusedConfig(block_n=128))
    n_vec = (4 * 2 + 2) * 256
    odd_pad = sum(int(m[3]) * 128 * 2 for m in unpadded.meta if int(m[4]) % 2)
    assert odd_pad == 2 * 2 * 128 * 2  # two layers' FC2, two tiles each
    assert (weight_nbytes(unpadded) - weight_nbytes(f16x2)
            == n_vec * (4 - 2) + unpadded.meta.numel() * 8 + odd_pad)
    ref = reference_model(fused)
    x = torch.randn(1, 1, 256, device=DEV).to(torch.bfloat16)
    assert torch.equal(ref(x.float()), reference_model(f16x2)(x.float()))
    assert bench._compiled(fused) is fused  # already one kernel: not handed to Inductor


_COMPILE_BODY = r"""
import os, subprocess
from daptq_ros.gpu import _triton_fused as tf
sig = {"x_ptr": "*bf16", "out_ptr": "*bf16", "w_ptr": "*i32", "s_ptr": "*i32", "vec_ptr": "*fp32",
       "meta_ptr": "*i64", "res_ptr": "*fp32", "qkv_ptr": "*fp32", "f_ptr": "*fp32", "act_ptr": "*i32",
       "bar_ptr": "*i32", "err_ptr": "*i32", "trace_ptr": "*i64", "n_layers": "i32", "phase_begin": "i32",
       "phase_end": "i32", "eps": "fp32"}
k = comp(tf.fused_trunk_kernel, sig,
         {"D": 4096, "FFN": 11008, "GROUP": 128, "BLOCK_N": 256, "BLOCK_D": 4096, "BLOCK_PD": 2048,
          "BLOCK_S": 1024, "BLOCK_PF": 8192, "SLICE": 128, "ACT_STRIDE": 5504, "HAS_BIAS": False,
          "USE_ASM": True,
          "MAX_SPIN": 1 << 22, "TRACE": False, "QUAD": True, "L2_AHEAD": 4, "THREADS": 256,
          "LN_SUBSET": True, "EARLY_ARRIVE": True},
         8, num_stages=1)
ptx = k.asm["ptx"]
out = {"prefetch": ptx.count("cp.async.bulk.prefetch.L2.global"), "acquire": ptx.count("ld.acquire.gpu"),
       "release": len(re.findall(r"red\.global\.gpu\.release\.add", ptx)),
       "f32_red": len(re.findall(r"red\.global\.gpu\.relaxed\.add\.f32", ptx)),
       "hfma2": ptx.count("fma.rn.f16x2")}
BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
if os.path.exists(BIN):
    path = os.path.join(os.environ["SASS_DIR"], "fused.cubin")
    with open(path, "wb") as f:
        f.write(k.asm["cubin"])
    sass = subprocess.run([BIN, "--dump-sass", path], capture_output=True, text=True, check=True).stdout
    res = subprocess.run([BIN, "--dump-resource-usage", path], capture_output=True, text=True,
                         check=True).stdout
    out["ldg_ef128"] = len(re.findall(r"LDG\.E\.EF\.128", sass))
    out["ldg_ef32"] = len(re.findall(r"LDG\.E\.EF\s", sass))
    out["local"] = int(re.search(r"LOCAL:(\d+)", res).group(1))
    out["regs"] = int(re.search(r"REG:(\d+)", res).group(1))
print(json.dumps(out))
"""


def test_persistent_kernel_compiles_for_hopper(tmp_path, monkeypatch):
    monkeypatch.setenv("SASS_DIR", str(tmp_path))
    r = compile_report(_COMPILE_BODY)
    assert r["prefetch"] >= 3  # rolling weight cells, the next GEMV's first cells and its scales
    assert r["acquire"] >= 1 and r["release"] >= 1  # the grid barrier
    assert r["f32_red"] >= 1  # partial tile sums as fire-and-forget fp32 reductions
    assert r["hfma2"] >= 4
    if "regs" in r:
        assert r["ldg_ef128"] >= 3 and r["ldg_ef32"] == 0  # weight cells: 16-byte loads only
        assert r["local"] == 0 and r["regs"] <= 255


def test_nodot_diagnostic_patches_only_the_dot_once(tmp_path):
    # scripts/gpu_fused_nodot.py (docs/gpu_bench.md, seventh run) rewrites one line of a copy
    import importlib.util
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location("nodot", root / "scripts" / "gpu_fused_nodot.py")
    nodot = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(nodot)
    src = root / "daptq_ros" / "gpu" / "_triton_fused.py"
    copy = tmp_path / "k.py"
    copy.write_text(src.read_text())
    nodot.main(["--kernel", str(copy)])
    before, after = src.read_text().splitlines(), copy.read_text().splitlines()
    assert "_q4x32_dot(w, x, USE_ASM)" not in copy.read_text() and "xx = x[0]" in copy.read_text()
    assert len(after) == len(before) + 1  # one line became two
    compile(copy.read_text(), str(copy), "exec")
    with pytest.raises(SystemExit, match="not found once"):
        nodot.main(["--kernel", str(copy)])


@pytest.mark.parametrize("block_n,programs", [(64, 5), (512, 3), (128, 7)])
def test_tma_copy_lists_name_each_programs_cells_in_consumption_order(block_n, programs):
    # the Gluon kernel consumes exactly these copies: GEMV by GEMV, cells [p·C/P, (p+1)·C/P)
    fused = FusedTrunk(_f16x2(_trunk(ffn=384)), FusedConfig(block_n=block_n))
    tw, gw = tma_width(block_n), fused.group_size // 8
    table, counts = tma_copy_list(fused._meta_rows, programs, fused.group_size, block_n)
    words, scales = fused.words.view(-1, tw), fused.scales.view(-1, tw)
    assert int(counts.sum()) == sum(fused._gemv_cells)
    for p in range(programs):
        got_w, got_s, want_w, want_s = [], [], [], []
        for k in range(int(counts[p])):
            w_row, s_row = int(table[p, 2 * k]), int(table[p, 2 * k + 1])
            got_w.append(words[w_row:w_row + gw * block_n // tw].reshape(-1))
            got_s.append(scales[s_row:s_row + block_n // tw].reshape(-1))
        rows = zip(fused._meta_rows, fused._gemv_cells, strict=True)
        for (w_off, s_off, _, _, n_groups, *_), cells in rows:
            for c in range(p * cells // programs, (p + 1) * cells // programs):
                t, g = divmod(c, n_groups)
                want_w.append(fused.words[w_off + c * gw * block_n:][:gw * block_n])
                pair = t * ((n_groups + 1) // 2) + g // 2
                want_s.append(fused.scales[s_off + pair * block_n:][:block_n])
        assert torch.equal(torch.cat(got_w), torch.cat(want_w))
        assert torch.equal(torch.cat(got_s), torch.cat(want_s))


def test_tma_shapes_it_cannot_take_fall_back_to_the_register_ring_kernel():
    q = _f16x2(_trunk())
    assert FusedTrunk(q, FusedConfig(stages=16))._tma_unfit.startswith("stages=16")
    assert "block_n >= 32" in FusedTrunk(q, FusedConfig(block_n=16))._tma_unfit
    assert FusedTrunk(q, FusedConfig())._tma_unfit is None
    x = torch.randn(1, 1, 256, device=DEV).to(torch.bfloat16)
    ref = FusedTrunk(q, FusedConfig(tma=False))(x).float()
    fallback = FusedTrunk(q, FusedConfig(stages=16))(x).float()
    assert relative_error(fallback, ref) < 1e-2  # the same kernel (on a GPU: atomics in another order)


_GLUON_COMPILE_BODY = r"""
import os, subprocess
try:
    import torch
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon._runtime import GluonASTSource
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor
    from triton.runtime.jit import mangle_type
    from daptq_ros.gpu import _gluon_fused as gf
except Exception as exc:
    print(json.dumps({"skip": f"Triton without Gluon/TMA: {type(exc).__name__}: {exc}"})); sys.exit(0)
lay = gl.NVMMASharedLayout(swizzle_byte_width=0, element_bitwidth=32, rank=2)
host = torch.zeros(64, 256, dtype=torch.int32)
sig = {"x_ptr": "*bf16", "out_ptr": "*bf16",
       "w_desc": mangle_type(TensorDescriptor.from_tensor(host, [32, 256], lay)),
       "s_desc": mangle_type(TensorDescriptor.from_tensor(host, [2, 256], lay)), "vec_ptr": "*fp32",
       "meta_ptr": "*i64", "stream_ptr": "*i32", "n_stream_ptr": "*i32", "res_ptr": "*fp32",
       "qkv_ptr": "*fp32", "f_ptr": "*fp32", "bar_ptr": "*i32", "err_ptr": "*i32",
       "trace_ptr": "*i64", "n_layers": "i32", "eps": "fp32"}
fn = gf.gluon_trunk_kernel
out = {}
for ws, gate in ((False, 0), (True, 0), (True, 2)):
    c = {"D": 4096, "FFN": 11008, "GROUP": 128, "BLOCK_N": 512, "BLOCK_PD": 2048, "BLOCK_S": 1024,
         "BLOCK_PF": 8192, "SLICE": 128, "STREAM_STRIDE": 128, "HAS_BIAS": False, "MAX_SPIN": 1 << 22,
         "TRACE": not ws, "STAGES": 4, "THREADS": 256, "TMA_W": 256, "WS": ws,
         "ONE_RT": ws, "AHEAD": ws, "EVICT": "evict_last" if ws else "", "GATE": gate,
         "GATE_LATE": gate > 0}  # (the timeline build too)
    attrs = {(fn.arg_names.index(a),): [["tt.divisibility", 16]] for a, t in sig.items() if t[0] == "*"}
    src = GluonASTSource(fn, {**sig, **{k: "constexpr" for k in c}}, c, attrs)
    k = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 8})
    ptx = k.asm["ptx"]
    r = {"tma": ptx.count("cp.async.bulk.tensor.2d"), "try_wait": ptx.count("mbarrier.try_wait"),
         "arrive": ptx.count("mbarrier.arrive"), "evict_last": ptx.count("L2::evict_last"),
         "release": len(re.findall(r"atom\.global\.gpu\.release\.add|red\.global\.gpu\.release\.add", ptx)),
         "shared": int(k.metadata.shared), "setmaxnreg": ptx.count("setmaxnreg")}
    BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if os.path.exists(BIN):
        path = os.path.join(os.environ["SASS_DIR"], f"gluon{int(ws)}{gate}.cubin")
        with open(path, "wb") as f:
            f.write(k.asm["cubin"])
        res = subprocess.run([BIN, "--dump-resource-usage", path], capture_output=True, text=True,
                             check=True).stdout
        r["local"] = int(re.search(r"LOCAL:(\d+)", res).group(1))
    out[f"ws{int(ws)}" + (f"gate{gate}" if gate else "")] = r
print(json.dumps(out))
"""


def test_tma_kernel_compiles_for_hopper_with_and_without_a_producer_warp(tmp_path, monkeypatch):
    monkeypatch.setenv("SASS_DIR", str(tmp_path))
    r = compile_report(_GLUON_COMPILE_BODY)
    for key in ("ws0", "ws1"):
        assert r[key]["tma"] >= 2  # words and scale pairs, each one bulk tensor copy per cell
        assert r[key]["try_wait"] >= 1 and r[key]["release"] >= 1  # slot mbarriers, the grid barrier
        assert 4 * 34816 + 8192 * 4 <= r[key]["shared"] <= 227 * 1024  # 4 slots of 34 KB, the input row
        assert r[key].get("local", 0) == 0
    assert r["ws1"]["setmaxnreg"] >= 1 and r["ws0"]["setmaxnreg"] == 0  # the producer gives up registers
    assert r["ws1"]["evict_last"] >= 1 and r["ws0"]["evict_last"] == 0  # EVICT reaches the constant loads
    # the gate: the producer also waits on the "passed" mbarrier, the compute warps arrive on it
    gated = r["ws1gate2"]
    assert gated["try_wait"] > r["ws1"]["try_wait"] and gated["arrive"] > r["ws1"]["arrive"]
    assert gated.get("local", 0) == 0 and gated["tma"] >= 2
