"""Device-only check: the fused one-token trunk on trunk shapes the benchmark does not time.

    PYTHONPATH=. python3 scripts/gpu_fused_shapes.py [--launches 50] [--config gate=1 ...]

For every shape (narrow trunks where most programs own no cell of a GEMV — the gate's early-open
case — padded tiles, separate q/k/v, biases, deep trunks) and every config (the default, the gate
at the barrier, a gate of one copy, no producer warp), it builds the
``w4a16_f16x2_g128`` trunk, runs :class:`~daptq_ros.gpu.fused.FusedTrunk` ``--launches`` times on
one token and compares every output with the float32 reference (relative error ≤ 2e-2). A grid
barrier that times out raises in ``run_fused``; it is reported as a failure of that row. Exit code
1 if any row fails. The CPU suite cannot run the Gluon kernel (no interpreter), so this is where
its other shapes are checked.
"""

from __future__ import annotations

import argparse
import sys

import torch

from daptq_ros.gpu.fused import FusedConfig, FusedTrunk
from daptq_ros.gpu.fused_bench import _label, parse_config
from daptq_ros.gpu.linear import quantize_model, reference_model
from daptq_ros.gpu.packing import relative_error
from daptq_ros.gpu.trunk import TrunkConfig, build_trunk

SHAPES = [
    TrunkConfig(name="d512-1l-bias", d_model=512, n_layers=1, n_heads=8, ffn=2048, bias=True),
    TrunkConfig(name="d768-3l-padded", d_model=768, n_layers=3, n_heads=12, ffn=3072),
    TrunkConfig(name="d1024-2l-qkv-bias", d_model=1024, n_layers=2, n_heads=16, ffn=4096, fused_qkv=False,
                bias=True),
    TrunkConfig(name="d2048-6l", d_model=2048, n_layers=6, n_heads=16, ffn=8192),
    TrunkConfig(name="d4096-2l", d_model=4096, n_layers=2, n_heads=32, ffn=11008),
]
CONFIGS = ["", "gate=1", "gate_late=0", "ws=0"]
MAX_REL_ERR = 2e-2


def check(shape: TrunkConfig, cfg: FusedConfig, launches: int, dev: torch.device) -> tuple[bool, str]:
    """Whether every launch matches the float32 reference, and a line saying so."""
    model, _ = quantize_model(build_trunk(shape, dev), "w4a16_f16x2_g128")
    ref = reference_model(model)
    gen = torch.Generator(device=dev).manual_seed(1)
    x = torch.randn(1, 1, shape.d_model, device=dev, generator=gen).to(torch.bfloat16)
    want = ref(x.float()).float()
    fused = FusedTrunk(model, cfg)
    errs = [relative_error(fused(x).float(), want) for _ in range(launches)]
    torch.cuda.synchronize(dev)
    ok = max(errs) <= MAX_REL_ERR
    verdict = "ok" if ok else "FAIL"
    return ok, f"{shape.name:20s} {_label(cfg):60s} rel err {min(errs):.1e}–{max(errs):.1e} {verdict}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--launches", type=int, default=50, help="fused forwards per shape and config")
    p.add_argument("--config", dest="configs", action="append", type=parse_config, metavar="FIELD=V,...",
                   help="configs to check instead of the built-in list (repeatable; '' = the default)")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA device: this check runs the fused kernels on the GPU")
    dev = torch.device("cuda")
    configs = args.configs or [parse_config(c) for c in CONFIGS]
    failed = 0
    for shape in SHAPES:
        for cfg in configs:
            try:
                ok, line = check(shape, cfg, args.launches, dev)
            except Exception as exc:  # a barrier time-out, a compile error: this row fails, the rest runs
                ok, line = False, f"{shape.name:20s} {_label(cfg):60s} {type(exc).__name__}: {str(exc)[:200]}"
            failed += not ok
            print(line, flush=True)
    print(f"{failed} of {len(SHAPES) * len(configs)} rows failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
