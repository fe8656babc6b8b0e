"""fp16x2 W4A16 GEMV: K-major packing, the PTX constants, interpreter correctness of the kernel's
fp32 form, the sm_90 compile of its inline-PTX form, and the Linear module (CPU-runnable)."""

import re

import numpy as np
import pytest
import torch
from test_gpu_kernels import DEV, ON_GPU, TOL, _problem, compile_report
from torch import nn

from daptq_ros.gpu import _triton_kernels, kernels
from daptq_ros.gpu.kernels import KernelConfig, launch_weight_only
from daptq_ros.gpu.linear import W4A16F16x2Linear, quantize_model, reference_model
from daptq_ros.gpu.packing import (
    KMAJOR_NIBBLE_POS,
    Int4KMajorWeight,
    Int4Weight,
    pack_int4_kmajor,
    quantize_int4_groupwise,
    reference_linear,
    relative_error,
    unpack_int4_kmajor,
)

MODE = 1 if ON_GPU else 0  # the interpreter runs the fp32 form; a GPU runs the inline PTX


def _h(bn, bk, split=1, serial=True, warps=1, stages=3):
    return KernelConfig(1, bn, bk, split, False, MODE, warps, stages, serial=serial, gemv=True)


def test_kmajor_round_trip_and_bit_layout():
    q = torch.arange(3 * 16).remainder(16).sub(8).reshape(3, 16).to(torch.int8)
    words = pack_int4_kmajor(q)
    assert words.dtype == torch.int32 and words.shape == (2, 3)
    assert torch.equal(unpack_int4_kmajor(words), q)
    w = int(words[1, 2]) & 0xFFFFFFFF  # k = 8..15 of row 2
    for j in range(8):
        assert (w >> (4 * KMAJOR_NIBBLE_POS[j])) & 0xF == int(q[2, 8 + j]) + 8
    # even k in the low 16-bit lane, odd k in the high lane, adjacent k pairs share a nibble slot
    assert KMAJOR_NIBBLE_POS == (0, 4, 1, 5, 2, 6, 3, 7)
    with pytest.raises(ValueError, match="multiple of 8"):
        pack_int4_kmajor(torch.zeros(2, 12, dtype=torch.int8))


def test_kmajor_weight_matches_byte_packed_weight():
    w = torch.randn(48, 256) * 0.02
    q = quantize_int4_groupwise(w, 64)
    qk = Int4KMajorWeight.from_int4(q)
    assert qk.shape == q.shape and qk.nbytes == q.nbytes
    assert torch.equal(qk.dequantize(), q.dequantize())


def _f16(bits: int) -> np.float16:
    return np.array([bits], dtype=np.uint16).view(np.float16)[0]


def test_ptx_magic_constants_give_exact_q_over_16():
    """Emulate the kernel's LOP3 + HFMA2 dequantization in fp16 with the constants read from its
    PTX: every offset-binary nibble t must become exactly (t − 8) / 16 in both nibble slots."""
    asm = _triton_kernels._Q4X8_DOT_ASM.value
    consts = dict(re.findall(r"mov\.b32 (\w+), 0x([0-9A-Fa-f]{8});", asm))
    lop = re.findall(r"lop3\.b32 \w+, [\w$]+, 0x([0-9A-Fa-f]{8}), 0x([0-9A-Fa-f]{8}), 0xEA;", asm)
    assert len(lop) == 4 and len(consts) == 4
    lo16 = {name: int(v, 16) & 0xFFFF for name, v in consts.items()}
    for t in range(16):
        for (mask, magic), (mul, add) in zip(lop[:2], (("k16", "kb16"), ("k256", "kb256")), strict=True):
            word = t * 0x00010001 * (1 if mask.upper() == "000F000F" else 16)  # t in both lanes
            lanes = (word & int(mask, 16)) | int(magic, 16)  # (a & b) | c, immLut 0xEA
            for half in (lanes & 0xFFFF, lanes >> 16):
                got = np.float16(_f16(half) * _f16(lo16[mul]) + _f16(lo16[add]))  # one rounding: exact
                assert float(got) == (t - 8) / 16, (t, mask)
    # the second pair of extractions reads the word shifted by 8 (nibble slots 2, 3 and 6, 7)
    assert "shr.u32 v, $1, 8;" in asm


# (M, N, K, group, config): one tile, ragged N, in-launch and two-launch split-K, several rows,
# BLOCK_K = half a group, 2 warps, bias on and off.
CASES = [
    (1, 128, 256, 128, _h(128, 128)),
    (1, 200, 512, 128, _h(128, 64, 4)),
    (3, 256, 256, 64, _h(256, 64, 2, serial=False)),
    (2, 256, 512, 128, _h(256, 128, 2, warps=2)),
    # register double-buffering (num_stages 2), several K-blocks per split and one per split
    (1, 200, 512, 64, _h(128, 32, 2, stages=2)),
    (2, 128, 256, 128, _h(128, 64, 4, stages=2)),
]


@pytest.mark.parametrize(("m", "n", "k", "group", "cfg"), CASES)
@pytest.mark.parametrize("bias", [True, False])
def test_f16x2_gemv_matches_reference(m, n, k, group, cfg, bias):
    x, w, b = _problem(m, n, k, seed=m + n + k, bias=bias)
    qk = Int4KMajorWeight.from_int4(quantize_int4_groupwise(w, group))
    out = launch_weight_only("w4a16_f16x2", x, qk, b, cfg)
    ref = reference_linear(x, qk.dequantize(torch.float32), b, torch.float32)
    assert out.dtype == torch.bfloat16 and out.shape == (m, n)
    assert relative_error(out, ref) <= TOL


def test_f16x2_gemv_every_integer_and_large_activations():
    k, n = 256, 128
    q = torch.arange(n * k).remainder(16).sub(8).reshape(n, k).to(torch.int8)
    qk = Int4KMajorWeight.from_int4(Int4Weight.from_int(q, torch.full((n, k // 128), 0.01), 128)).to(DEV)
    x = (torch.randn(2, k, generator=torch.Generator().manual_seed(3)) * 300).to(torch.bfloat16).to(DEV)
    out = launch_weight_only("w4a16_f16x2", x, qk, None, _h(128, 128, 2))
    ref = reference_linear(x, qk.dequantize(torch.float32), None, torch.float32)
    assert relative_error(out, ref) <= TOL
    assert int(kernels.tile_counters(x.device, 1).abs().sum()) == 0  # the serial split reset them


def test_f16x2_launcher_rejects_bad_inputs():
    x, w, _ = _problem(1, 128, 256, seed=1, bias=False)
    q = quantize_int4_groupwise(w, 128)
    with pytest.raises(TypeError, match="Int4KMajorWeight"):
        launch_weight_only("w4a16_f16x2", x, q, None, _h(128, 128))
    qk = Int4KMajorWeight.from_int4(q)
    with pytest.raises(ValueError, match="BLOCK_M = 1"):
        launch_weight_only("w4a16_f16x2", x, qk, None, KernelConfig(16, 64, 128, gemv=False))
    with pytest.raises(TypeError, match="bfloat16"):
        launch_weight_only("w4a16_f16x2", x.half(), qk, None, _h(128, 128))
    with pytest.raises(ValueError, match="at most 8 rows"):
        kernels.w4a16_f16x2_linear(torch.zeros(9, 256, dtype=torch.bfloat16, device=DEV), qk)


def test_f16x2_candidates():
    c = kernels.f16x2_gemv_configs(1, 12288, 4096, 128)
    assert c and all(cf.gemv and cf.block_m == 1 and cf.block_n >= 128 * cf.num_warps for cf in c)
    assert all(cf.mode == 1 for cf in c)
    assert all(cf.mode == 0 for cf in kernels.f16x2_gemv_configs(1, 12288, 4096, 128, asm=False))
    # 48 tiles of 256 → split 16 reaches ≥ 4 programs per SM on 132 SMs; also ÷2 and ×2 of it
    assert (c[0].block_n, c[0].block_k, c[0].split_k, c[0].num_stages) == (256, 64, 16, 2)
    assert [cf.split_k for cf in c[:3]] == [16, 8, 32]
    assert {cf.num_stages for cf in c} == {2, 3}
    assert kernels.candidate_configs("w4a16_f16x2", 9, 4096, 4096, 128) == []
    assert all(cf.mode == 0 for cf in kernels.fallback_configs("w4a16_f16x2", 1, 4096, 4096, 128))
    assert c[0].short() == "g1n256k64s16rw2p2" and c[0].short() != kernels.replace(c[0], mode=0).short()


def test_f16x2_module_kernel_and_prefill_fallback():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 512), nn.GELU(), nn.Linear(512, 256)).to(torch.bfloat16).to(DEV)
    qm, rep = quantize_model(model, "w4a16_f16x2_g128")
    assert rep.quantized == ["0", "2"] and isinstance(qm[0], W4A16F16x2Linear)
    ref = reference_model(qm)
    tuner = kernels.Autotuner(budget_s=0.0)
    kernels.set_tuner(tuner)
    try:
        for rows in (1, 5, 12):  # GEMV for ≤ 8 tokens, dequantize + cuBLAS beyond
            x = torch.randn(rows, 256, device=DEV).to(torch.bfloat16)
            assert relative_error(qm(x), ref(x.float())) <= TOL, rows
    finally:
        kernels.set_tuner(kernels.Autotuner())
    assert {r.key.split("|")[0] for r in tuner.records.values()} == {"w4a16_f16x2"}


_COMPILE_BODY = r"""
DIV16 = {"K", "N", "stride_xm", "stride_wc", "stride_sg", "stride_om", "stride_os"}
sig = {"x_ptr": "*i32", "w_ptr": "*i32", "s_ptr": "*bf16", "bias_ptr": "*bf16", "out_ptr": "*bf16",
       "ws_ptr": "*fp32", "cnt_ptr": "*i32", "M": "i32", "N": "i32", "K": "i32", "stride_xm": "i32",
       "stride_wc": "i32", "stride_sg": "i32", "stride_om": "i32", "stride_os": "i32",
       "k_blocks_per_split": "i32"}
k = comp(tk.w4a16_f16x2_gemv_kernel, sig,
         {"GROUP": 128, "BLOCK_N": 256, "BLOCK_K": 128, "HAS_BIAS": False, "SPLIT_MODE": 2, "EVEN_N": True,
          "USE_ASM": True, "SPLIT": 16, "PREFETCH": True}, 2, div16=DIV16, num_stages=3)
ptx = k.asm["ptx"]
print(json.dumps({"lop3": ptx.count("lop3.b32"), "hfma2": ptx.count("fma.rn.f16x2"),
                  "v4": bool(re.search(r"ld\.global[.\w]*\.v4\.b32", ptx)), "mma": "mma" in ptx,
                  "i2f": "cvt.rn.f32.s32" in ptx}))
"""


@pytest.mark.skipif(ON_GPU, reason="compile check is for GPU-less CI")
def test_f16x2_gemv_compiles_for_hopper_with_packed_math():
    r = compile_report(_COMPILE_BODY)
    # 16 words × 4 columns per thread and K-block: 4 LOP3 and 7 fp16x2 FMAs per word
    assert r["lop3"] >= 4 * 64 and r["hfma2"] >= 7 * 64
    assert r["v4"] and not r["mma"] and not r["i2f"]


_SASS_BODY = r"""
import os, subprocess
BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
if not os.path.exists(BIN):
    print(json.dumps({"skip": "Triton ships no cuobjdump here"})); sys.exit(0)
DIV16 = {"K", "N", "stride_xm", "stride_wn", "stride_wc", "stride_sg", "stride_om", "stride_os"}
base = {"M": "i32", "N": "i32", "K": "i32", "stride_xm": "i32", "stride_sg": "i32", "stride_om": "i32",
        "stride_os": "i32", "k_blocks_per_split": "i32"}
ptrs = {"x_ptr": "*bf16", "w_ptr": "*i32", "s_ptr": "*bf16", "bias_ptr": "*bf16", "out_ptr": "*bf16",
        "ws_ptr": "*fp32", "cnt_ptr": "*i32"}

def sass_count(fn, sig, consts, warps):
    k = comp(fn, sig, consts, warps, div16=DIV16, num_stages=3)
    path = os.path.join(os.environ["SASS_DIR"], fn.__name__ + ".cubin")
    with open(path, "wb") as f:
        f.write(k.asm["cubin"])
    sass = subprocess.run([BIN, "--dump-sass", path], capture_output=True, text=True, check=True).stdout
    return sum(1 for line in sass.splitlines() if re.match(r"\s+/\*[0-9a-f]+\*/", line))

out = {}
for bk in (64, 128):  # one token, no split: the SASS growth per extra 64 K is the per-weight cost
    out[f"fp32_{bk}"] = sass_count(tk.w4a16_gemv_kernel, {**ptrs, **base, "stride_wn": "i32"},
        {"GROUP": 128, "BLOCK_M": 1, "BLOCK_N": 64, "BLOCK_K": bk, "HAS_BIAS": False, "SPLIT_MODE": 0,
         "EVEN_N": True}, 4)
    out[f"f16x2_{bk}"] = sass_count(tk.w4a16_f16x2_gemv_kernel,
        {**ptrs, "x_ptr": "*i32", **base, "stride_wc": "i32"},
        {"GROUP": 128, "BLOCK_N": 256, "BLOCK_K": bk, "HAS_BIAS": False, "SPLIT_MODE": 0, "EVEN_N": True,
         "USE_ASM": True, "SPLIT": 1, "PREFETCH": False}, 2)
# weights per thread per extra 64 K: BLOCK_N * 64 / threads
out["fp32_per_weight"] = (out["fp32_128"] - out["fp32_64"]) / (64 * 64 / 128)
out["f16x2_per_weight"] = (out["f16x2_128"] - out["f16x2_64"]) / (256 * 64 / 64)
print(json.dumps(out))
"""


@pytest.mark.skipif(ON_GPU, reason="compile check is for GPU-less CI")
def test_f16x2_gemv_needs_fewer_instructions_per_weight(tmp_path, monkeypatch, capsys):
    """sm_90 SASS per int4 weight, fp16x2 GEMV vs the fp32 GEMV (``pytest -s`` prints the counts;
    docs/gpu_bench.md quotes them)."""
    monkeypatch.setenv("SASS_DIR", str(tmp_path))
    r = compile_report(_SASS_BODY)
    with capsys.disabled():
        print(f"\nSASS instructions per weight: fp32 GEMV {r['fp32_per_weight']:.2f}, "
              f"fp16x2 GEMV {r['f16x2_per_weight']:.2f}")
    assert r["f16x2_per_weight"] < 0.7 * r["fp32_per_weight"]
    assert r["f16x2_per_weight"] < 3.5
