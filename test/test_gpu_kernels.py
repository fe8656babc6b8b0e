"""Triton kernels of daptq_ros.gpu.kernels on tiny shapes vs the float32 reference.

Without a GPU they run under the Triton interpreter (``TRITON_INTERPRET=1``, set here before the
kernel module is imported); with CUDA and ``TRITON_INTERPRET=0`` they run on the device.
The interpreter has no bfloat16 ``tl.dot``, so dequantization mode 2 (bf16 operands) is only
checked on a GPU (the benchmark's tuner checks every config it times there, too).
"""

import os

import pytest
import torch

ON_GPU = torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") == "0"
if not ON_GPU:
    os.environ["TRITON_INTERPRET"] = "1"

triton = pytest.importorskip("triton", reason="triton not installed (pip install triton; dev extra)")

from daptq_ros.gpu import kernels  # noqa: E402
from daptq_ros.gpu.kernels import Autotuner, KernelConfig, launch_weight_only  # noqa: E402
from daptq_ros.gpu.packing import (  # noqa: E402
    Int4Weight,
    Int8Weight,
    quantize_int4_groupwise,
    quantize_int8_per_channel,
    quantize_rows_int8,
    reference_linear,
    relative_error,
)

DEV = torch.device("cuda" if ON_GPU else "cpu")
MODES = (0, 1, 2) if ON_GPU else (0, 1)
TOL = 1e-2  # bf16 output rounding is ~3e-3


def _problem(m, n, k, seed, bias=True):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g).to(torch.bfloat16)
    w = torch.randn(n, k, generator=g) * 0.02
    b = (torch.randn(n, generator=g) * 0.1).to(torch.bfloat16) if bias else None
    return x.to(DEV), w.to(DEV), (b.to(DEV) if b is not None else None)


# (M, N, K, group, config): single tile, several N tiles with a ragged edge (EVEN_N False),
# split-K with the reduction kernel, several M tiles, the unswapped orientation.
W4_CASES = [
    (1, 64, 128, 128, KernelConfig(16, 64, 128, 1, True, 1)),
    (5, 96, 256, 64, KernelConfig(16, 64, 64, 2, True, 1)),
    (3, 64, 256, 64, KernelConfig(16, 64, 32, 4, True, 0)),
    (33, 64, 256, 128, KernelConfig(16, 64, 128, 1, True, 1)),
    (20, 96, 256, 128, KernelConfig(32, 64, 64, 2, False, 1)),
    (17, 96, 512, 128, KernelConfig(16, 64, 64, 4, True, 1, serial=False)),  # two-launch reduction
    (2, 192, 512, 64, KernelConfig(16, 64, 32, 8, True, 1, serial=True)),  # in-launch, 3×1 tiles
]


@pytest.mark.parametrize(("m", "n", "k", "group", "cfg"), W4_CASES)
def test_w4a16_matches_reference(m, n, k, group, cfg):
    x, w, b = _problem(m, n, k, seed=m + n)
    q4 = quantize_int4_groupwise(w, group)
    out = launch_weight_only("w4a16", x, q4, b, cfg)
    ref = reference_linear(x, q4.dequantize(), b, torch.float32)
    assert out.shape == (m, n) and out.dtype == torch.bfloat16
    assert relative_error(out, ref) < TOL


W8_CASES = [
    (1, 64, 128, KernelConfig(16, 64, 128, 1, True, 1)),
    (7, 96, 256, KernelConfig(16, 64, 64, 2, True, 0)),
    (40, 64, 128, KernelConfig(16, 64, 32, 2, False, 1)),
    (9, 64, 256, KernelConfig(16, 64, 64, 4, True, 1, serial=False)),
]


@pytest.mark.parametrize(("m", "n", "k", "cfg"), W8_CASES)
def test_w8a16_matches_reference(m, n, k, cfg):
    x, w, b = _problem(m, n, k, seed=3 * m + n)
    q8 = quantize_int8_per_channel(w)
    out = launch_weight_only("w8a16", x, q8, b, cfg)
    assert relative_error(out, reference_linear(x, q8.dequantize(), b, torch.float32)) < TOL


@pytest.mark.parametrize("mode", MODES)
def test_dequant_modes_cover_extreme_integers(mode):
    # Weights that hit -8 / 7 (int4) and -127 / 127 (int8) exactly, without a bias.
    k, n = 128, 64
    x, _, _ = _problem(2, n, k, seed=11, bias=False)
    levels = (torch.arange(n * k, device=DEV).reshape(n, k) % 16 - 8).to(torch.int8)
    scales = torch.rand(n, k // 64, device=DEV) * 0.02 + 0.001
    w4 = Int4Weight.from_int(levels, scales, 64)
    assert int(w4.unpacked().min()) == -8 and int(w4.unpacked().max()) == 7
    out4 = launch_weight_only("w4a16", x, w4, None, KernelConfig(16, 64, 64, 1, True, mode))
    assert relative_error(out4, reference_linear(x, w4.dequantize(), None, torch.float32)) < TOL
    ints8 = (torch.arange(n * k, device=DEV).reshape(n, k) % 255 - 127).to(torch.int8)
    w8 = Int8Weight.from_int(ints8, torch.rand(n, device=DEV) * 0.01 + 0.001)
    out8 = launch_weight_only("w8a16", x, w8, None, KernelConfig(16, 64, 128, 1, True, mode))
    assert relative_error(out8, reference_linear(x, w8.dequantize(), None, torch.float32)) < TOL


def test_wrappers_pick_a_valid_config_and_keep_leading_dims():
    kernels.set_tuner(Autotuner(budget_s=0.0, quick=True))
    x, w, b = _problem(6, 64, 128, seed=5)
    q4 = quantize_int4_groupwise(w, 64)
    out = kernels.w4a16_linear(x.reshape(2, 3, 128), q4, b)
    assert out.shape == (2, 3, 64)
    ref = reference_linear(x, q4.dequantize(), b, torch.float32).reshape(2, 3, 64)
    assert relative_error(out, ref) < TOL
    # M=6 tunes in the GEMV bucket 8
    assert any(key.startswith("w4a16|M8|N64|K128|G64") for key in kernels.get_tuner().records)


def test_w8a8_intmm_matches_fake_quant_reference():
    x, w, b = _problem(3, 64, 128, seed=9)
    q8 = quantize_int8_per_channel(w)
    w_t = kernels.prepare_int_mm_weight(q8)
    xq, sx = quantize_rows_int8(x)
    ref = reference_linear((xq.float() * sx), q8.dequantize(), b, torch.float32)
    for use_triton in (True, False):
        out = kernels.w8a8_linear(x, q8, w_t, b, use_triton=use_triton)
        assert out.shape == (3, 64)
        assert relative_error(out, ref) < TOL


def test_serial_split_leaves_tile_counters_at_zero():
    x, w, b = _problem(20, 128, 512, seed=21)
    q4 = quantize_int4_groupwise(w, 128)
    cfg = KernelConfig(16, 64, 64, 4, True, 1, serial=True)
    ref = reference_linear(x, q4.dequantize(), b, torch.float32)
    for _ in range(2):  # a second launch relies on the first having reset the counters
        assert relative_error(launch_weight_only("w4a16", x, q4, b, cfg), ref) < TOL
    assert int(kernels.tile_counters(x.device, 1).abs().sum()) == 0


def test_launch_rejects_bad_shapes():
    x, w, b = _problem(2, 64, 128, seed=1)
    q4 = quantize_int4_groupwise(w, 64)
    with pytest.raises(ValueError, match="divide group_size"):
        launch_weight_only("w4a16", x, q4, b, KernelConfig(16, 64, 128, 1, True, 1))
    with pytest.raises(ValueError, match="input features"):
        kernels.w4a16_linear(x[:, :64], q4, b, config=KernelConfig(16, 64, 64, 1, True, 1))
    with pytest.raises(TypeError, match="Int4Weight"):
        launch_weight_only("w4a16", x, quantize_int8_per_channel(w), b, KernelConfig())



# Compiles two kernels for sm_90 with Triton's own compiler (no GPU needed). It runs in a fresh
# interpreter because this module switched Triton to interpret mode at import.
COMPILE_PRELUDE = r"""
import json, re, sys
import triton
try:
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
except ImportError as exc:
    print(json.dumps({"skip": f"Triton compile API not available: {exc}"})); sys.exit(0)
from daptq_ros.gpu import _triton_kernels as tk

# compile fn for sm_90; pointers (and the args in div16) marked divisible by 16, as Triton
# specializes them at a real launch
def comp(fn, signature, constexprs, num_warps, div16=(), num_stages=None):
    sig = {**signature, **{name: "constexpr" for name in constexprs}}
    attrs = {(fn.arg_names.index(a),): [["tt.divisibility", 16]] for a, t in signature.items()
             if t[0] == "*" or a in div16}
    try:
        src = ASTSource(fn, sig, constexprs, attrs)
    except TypeError as exc:
        print(json.dumps({"skip": f"Triton ASTSource signature differs: {exc}"})); sys.exit(0)
    options = {"num_warps": num_warps}
    if num_stages is not None:
        options["num_stages"] = num_stages
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options)
"""


def compile_report(body: str) -> dict:
    """Run ``COMPILE_PRELUDE + body`` (which prints one JSON line) in a subprocess without
    ``TRITON_INTERPRET``; returns the JSON, or skips when this Triton lacks the compile API."""
    import json
    import subprocess
    import sys

    import daptq_ros

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(daptq_ros.__file__)))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    proc = subprocess.run([sys.executable, "-c", COMPILE_PRELUDE + body], capture_output=True, text=True,
                          env=env, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    if "skip" in result:
        pytest.skip(result["skip"])
    return result


_COMPILE_BODY = r"""
common = {"M": "i32", "N": "i32", "K": "i32", "stride_xm": "i32", "stride_wn": "i32", "stride_om": "i32",
          "stride_os": "i32", "k_blocks_per_split": "i32"}
w4 = comp(tk.w4a16_kernel,
          {"x_ptr": "*bf16", "w_ptr": "*u8", "s_ptr": "*bf16", "bias_ptr": "*bf16", "out_ptr": "*bf16",
           "ws_ptr": "*fp32", "cnt_ptr": "*i32",
           **common, "stride_sg": "i32"},
          {"GROUP": 128, "BLOCK_M": 16, "BLOCK_N": 128, "BLOCK_K": 128, "SWAP_AB": True, "MODE": 1,
           "HAS_BIAS": False, "SPLIT_MODE": 2, "EVEN_N": True}, 4)
w8 = comp(tk.w8a16_kernel,
          {"x_ptr": "*bf16", "w_ptr": "*i8", "s_ptr": "*fp32", "bias_ptr": "*bf16", "out_ptr": "*bf16",
           "ws_ptr": "*bf16", "cnt_ptr": "*bf16", **common},
          {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 128, "SWAP_AB": True, "MODE": 0, "HAS_BIAS": True,
           "SPLIT_MODE": 0, "EVEN_N": False}, 4)
print(json.dumps({"wgmma": ["wgmma.mma_async" in k.asm["ptx"] for k in (w4, w8)],
                  "atom": bool(re.search(r"atom\.global\.\S*acq_rel", w4.asm["ptx"]))}))
"""


@pytest.mark.skipif(ON_GPU, reason="compile check is for GPU-less CI")
def test_kernels_compile_for_hopper_with_wgmma():
    result = compile_report(_COMPILE_BODY)
    assert result["wgmma"] == [True, True]  # Hopper tensor-core path, not mma.sync / FMA
    assert result["atom"]  # the split-K tile counter is a release/acquire atomic
