"""Launch each batch-1 int4 kernel once on one layer shape, for Nsight Compute (GPU machine only).

    ncu --clock-control none --kernel-name regex:'f16x2|gemv|int4|nvjet|sm90' \\
        --section SpeedOfLight --section Occupancy --section WarpStateStats --section LaunchStats \\
        python3 scripts/gpu_ncu_probe.py --configs 3

Launches, in order: the first ``--configs`` fp16x2 GEMV candidates, the first fp32 W4A16 GEMV
candidate, torch's tinygemm int4 and cuBLAS bf16, on random weights of shape N × K (default the
d-4096 trunk's qkv, 12288 × 4096) and one bf16 token.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from daptq_ros.gpu import kernels
from daptq_ros.gpu.linear import TorchInt4Linear
from daptq_ros.gpu.packing import Int4KMajorWeight, quantize_int4_groupwise


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=12288, help="output features")
    p.add_argument("--k", type=int, default=4096, help="input features")
    p.add_argument("--configs", type=int, default=3, help="fp16x2 GEMV candidates to launch")
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("gpu_ncu_probe needs a CUDA device")
    n, k, dev = args.n, args.k, torch.device("cuda")
    w = torch.randn(n, k, device=dev) * 0.02
    x = torch.randn(1, k, device=dev).to(torch.bfloat16)
    q4 = quantize_int4_groupwise(w, 128)
    qk = Int4KMajorWeight.from_int4(q4)
    f16x2 = kernels.candidate_configs("w4a16_f16x2", 1, n, k, 128)[: args.configs]
    for cfg in f16x2:
        kernels.launch_weight_only("w4a16_f16x2", x, qk, None, cfg)
    old = next(c for c in kernels.candidate_configs("w4a16", 1, n, k, 128) if c.gemv)
    kernels.launch_weight_only("w4a16", x, q4, None, old)
    lin = torch.nn.Linear(k, n, bias=False, device=dev, dtype=torch.bfloat16)
    TorchInt4Linear(lin, 128).to(dev)(x)
    F.linear(x, lin.weight)
    torch.cuda.synchronize()
    print("fp16x2:", [c.short() for c in f16x2], "fp32 GEMV:", old.short())


if __name__ == "__main__":
    main()
