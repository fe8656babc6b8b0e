"""GEMV kernels (M ≤ 8, no tl.dot) of daptq_ros.gpu on tiny shapes vs the float32 reference.

Run under the Triton interpreter without a GPU (``TRITON_INTERPRET=1`` set before import), on the
device with ``TRITON_INTERPRET=0``. Shapes are small: the interpreter is slow.
"""

import pytest
import torch

# test_gpu_kernels sets TRITON_INTERPRET (unless on a GPU with TRITON_INTERPRET=0) before triton is
# imported, and skips when triton is not installed.
from test_gpu_kernels import DEV, ON_GPU, TOL, _problem, compile_report

from daptq_ros.gpu import kernels
from daptq_ros.gpu.kernels import KernelConfig, gemv_configs, launch_weight_only, tune_bucket
from daptq_ros.gpu.packing import (
    Int4Weight,
    Int8Weight,
    quantize_int4_groupwise,
    quantize_int8_per_channel,
    reference_linear,
    relative_error,
)


def _g(bm, bn, bk, split=1, serial=True):
    return KernelConfig(bm, bn, bk, split, False, 1, 4, 3, serial=serial, gemv=True)


# (M, N, K, group, config): one row, several rows as programs (BLOCK_M 1), rows sharing a tile
# (BLOCK_M 4, ragged M), ragged N, in-launch and two-launch split-K.
W4_CASES = [
    (1, 32, 128, 128, _g(1, 32, 128)),
    (1, 48, 256, 64, _g(1, 32, 64, 4, serial=True)),
    (3, 32, 256, 128, _g(1, 32, 128, 2, serial=False)),
    (3, 32, 128, 64, _g(4, 16, 64, 2)),
    # K-blocks spanning 2 and 4 groups (one scale per word group), ragged N, split-K, BLOCK_M 1 and 2
    (1, 48, 512, 64, _g(1, 32, 128, 2, serial=True)),
    (2, 32, 512, 32, _g(1, 32, 128)),
    (2, 32, 512, 64, _g(2, 16, 256, 2, serial=False)),
]


@pytest.mark.parametrize(("m", "n", "k", "group", "cfg"), W4_CASES)
def test_w4a16_gemv_matches_reference(m, n, k, group, cfg):
    x, w, b = _problem(m, n, k, seed=m + n + k)
    q = quantize_int4_groupwise(w, group)
    out = launch_weight_only("w4a16", x, q, b, cfg)
    ref = reference_linear(x, q.dequantize(torch.float32), b, torch.float32)
    assert out.dtype == torch.bfloat16 and out.shape == (m, n)
    assert relative_error(out, ref) <= TOL


W8_CASES = [
    (1, 32, 128, _g(1, 32, 128)),
    (2, 48, 256, _g(1, 32, 64, 4, serial=True)),
    (3, 32, 256, _g(4, 16, 128, 2, serial=False)),
]


@pytest.mark.parametrize(("m", "n", "k", "cfg"), W8_CASES)
def test_w8a16_gemv_matches_reference(m, n, k, cfg):
    x, w, b = _problem(m, n, k, seed=7 * m + n)
    q = quantize_int8_per_channel(w)
    out = launch_weight_only("w8a16", x, q, b, cfg)
    ref = reference_linear(x, q.dequantize(torch.float32), b, torch.float32)
    assert relative_error(out, ref) <= TOL


def test_gemv_extreme_integers_and_large_activations():
    """Every int4 / int8 value, activations far from 1: the affine correction must stay exact."""
    k, n = 128, 16
    q4 = torch.arange(n * k).remainder(16).sub(8).reshape(n, k).to(torch.int8)
    w4 = Int4Weight.from_int(q4, torch.full((n, k // 64), 0.01), 64).to(DEV)
    q8 = torch.arange(n * k).remainder(255).sub(127).reshape(n, k).to(torch.int8)
    w8 = Int8Weight.from_int(q8, torch.full((n, 1), 0.001)).to(DEV)
    x = (torch.randn(2, k, generator=torch.Generator().manual_seed(3)) * 300).to(torch.bfloat16).to(DEV)
    for kind, wq in (("w4a16", w4), ("w8a16", w8)):
        out = launch_weight_only(kind, x, wq, None, _g(1, 16, 64))
        ref = reference_linear(x, wq.dequantize(torch.float32), None, torch.float32)
        assert relative_error(out, ref) <= TOL, kind


def test_gemv_serial_split_leaves_counters_at_zero_and_wrapper_uses_gemv():
    x, w, b = _problem(1, 32, 256, seed=5)
    q = quantize_int4_groupwise(w, 64)
    launch_weight_only("w4a16", x, q, b, _g(1, 32, 64, 4, serial=True))
    assert int(kernels.tile_counters(x.device, 1).abs().sum()) == 0
    tuner = kernels.Autotuner(budget_s=0.0)
    kernels.set_tuner(tuner)
    try:
        out = kernels.w4a16_linear(x.reshape(1, 1, 256), q, b)
    finally:
        kernels.set_tuner(kernels.Autotuner())
    assert out.shape == (1, 1, 32)
    (rec,) = tuner.records.values()
    assert rec.config.gemv and rec.key.startswith("w4a16|M1|")


def test_gemv_candidates_and_buckets():
    assert [tune_bucket(m) for m in (1, 2, 3, 8, 9, 16, 64)] == [1, 2, 4, 8, 16, 16, 64]
    c1 = gemv_configs("w4a16", 1, 2048, 2048, 128)
    assert c1 and all(c.gemv and c.block_m == 1 and 2048 // c.block_k >= c.split_k for c in c1)
    # N=2048 / 64 = 32 tiles: split 16 (>= 4 programs per SM on 132 SMs), capped by 16 K-blocks
    assert (c1[0].block_n, c1[0].block_k, c1[0].split_k) == (64, 128, 16)
    c4 = gemv_configs("w8a16", 4, 6144, 2048)
    assert c4[0].block_m == 4 and any(c.block_m == 1 for c in c4)
    assert gemv_configs("w4a16", 16, 2048, 2048, 128) == []
    cands = kernels.candidate_configs("w4a16", 1, 2048, 8192, 128)
    assert cands[0].gemv and any(not c.gemv for c in cands)
    assert not any(c.gemv for c in kernels.fallback_configs("w4a16", 1, 2048, 8192, 128))


_COMPILE_BODY = r"""
# strides / sizes divisible by 16 as well, as Triton specializes them at a real launch
DIV16 = {"K", "N", "stride_xm", "stride_wn", "stride_sg", "stride_om", "stride_os"}
common = {"M": "i32", "N": "i32", "K": "i32", "stride_xm": "i32", "stride_wn": "i32", "stride_om": "i32",
          "stride_os": "i32", "k_blocks_per_split": "i32"}
ptrs = {"x_ptr": "*bf16", "w_ptr": "*i32", "bias_ptr": "*bf16", "out_ptr": "*bf16", "ws_ptr": "*fp32",
        "cnt_ptr": "*i32"}
w4 = comp(tk.w4a16_gemv_kernel, {**ptrs, "s_ptr": "*bf16", **common, "stride_sg": "i32"},
          {"GROUP": 128, "BLOCK_M": 1, "BLOCK_N": 64, "BLOCK_K": 128, "HAS_BIAS": False, "SPLIT_MODE": 2,
           "EVEN_N": True}, 4, div16=DIV16, num_stages=3)
w8 = comp(tk.w8a16_gemv_kernel, {**ptrs, "s_ptr": "*fp32", **common},
          {"BLOCK_M": 1, "BLOCK_N": 64, "BLOCK_K": 128, "HAS_BIAS": True, "SPLIT_MODE": 0,
           "EVEN_N": False}, 4, div16=DIV16, num_stages=3)
print(json.dumps({"v4": [bool(re.search(r"ld\.global[.\w]*\.v4\.b32", k.asm["ptx"])) for k in (w4, w8)],
                  "mma": ["mma" in k.asm["ptx"] for k in (w4, w8)],
                  "i2f": ["cvt.rn.f32.s32" in k.asm["ptx"] for k in (w4, w8)]}))
"""


@pytest.mark.skipif(ON_GPU, reason="compile check is for GPU-less CI")
def test_gemv_kernels_compile_for_hopper_with_wide_loads():
    result = compile_report(_COMPILE_BODY)
    assert result["v4"] == [True, True]  # 16-byte weight loads
    assert result["mma"] == [False, False]  # CUDA cores only
    assert result["i2f"] == [False, False]  # dequantization without int→float conversions
