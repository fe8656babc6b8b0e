"""Launch the fused one-token trunk kernel a few times, for Nsight Compute (GPU machine only).

    ncu --clock-control none --kernel-name fused_trunk_kernel --launch-skip 2 --launch-count 1 \\
        --section SpeedOfLight --section MemoryWorkloadAnalysis --section WarpStateStats \\
        --section SchedulerStats --section SourceCounters -o fused \\
        python3 scripts/gpu_ncu_fused.py --config early_arrive=1
    ncu -i fused.ncu-rep --page source --csv --print-source sass > fused_sass.csv

Builds the d-4096 trunk (random weights, the ``w4a16_f16x2_g128`` quantization of
``daptq_ros.gpu.fused_bench``), fuses it under ``--config`` (``FIELD=V,...``, as ``fused_bench``
takes it) and runs ``--launches`` forwards of one token. The per-instruction stall samples of
the report say which instructions the warps wait at (weight loads, the dot, the barrier).
"""

from __future__ import annotations

import argparse

import torch

from daptq_ros.gpu.fused import FusedTrunk
from daptq_ros.gpu.fused_bench import TRUNKS, parse_config
from daptq_ros.gpu.linear import quantize_model
from daptq_ros.gpu.trunk import build_trunk


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--trunk", default="trunk-315m-d4096", choices=sorted(TRUNKS))
    p.add_argument("--config", type=parse_config, default=parse_config(""), metavar="FIELD=V,...",
                   help="FusedConfig changes from the default")
    p.add_argument("--launches", type=int, default=4, help="forwards to run")
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("gpu_ncu_fused needs a CUDA device")
    dev = torch.device("cuda")
    cfg = TRUNKS[args.trunk]()
    with torch.no_grad():
        model, _ = quantize_model(build_trunk(cfg, dev), "w4a16_f16x2_g128")
        fused = FusedTrunk(model, args.config)
        x = torch.randn(1, 1, cfg.d_model, device=dev).to(torch.bfloat16)
        for _ in range(args.launches):
            fused(x)
    torch.cuda.synchronize()
    print(f"{args.trunk}: {args.launches} fused launches, config {args.config}")


if __name__ == "__main__":
    main()
