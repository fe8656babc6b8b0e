"""Per-layer diagnosis for the GPU benchmark: every kernel candidate on the VLA trunk's shapes,
and where the full trunk's non-matmul time goes.

Run on the GPU machine (≈ 1–2 min)::

    PYTHONPATH=. python3 -m daptq_ros.gpu.layer_bench --json $OUT/layers.json

1. For each Linear shape of ``trunk-302m`` (N × K = 6144×2048, 2048×2048, 8192×2048,
   2048×8192) and M ∈ {1, 16}: bf16 ``F.linear`` (cuBLAS), torch tinygemm int4 (g128) and
   *every* W4A16-g128 / W8A16 candidate of :func:`kernels.candidate_configs` (GEMV and
   tensor-core tiles) and of the fp16x2 GEMV (``w4a16_f16x2_g128``), each checked against float32
   and timed like the tuner does (CUDA graph, L2 flushed, median of 25); printed as µs and
   effective GB/s against the weight bytes. ``--impls`` picks implementations, ``--trunk`` the
   shapes (``trunk-315m-d4096``: the 7B-VLA layer shapes), ``--no-profile`` skips step 2.
2. The bf16 and best-quantized trunk-302m forward at M = 1, eager under ``torch.profiler``:
   summed kernel time per kernel name, split into matmul and non-matmul kernels.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from daptq_ros.gpu import kernels, timing
from daptq_ros.gpu.linear import TorchInt4Linear, quantize_model
from daptq_ros.gpu.packing import (
    Int4KMajorWeight,
    quantize_int4_groupwise,
    quantize_int8_per_channel,
    reference_linear,
    relative_error,
)
from daptq_ros.gpu.trunk import TrunkConfig, build_trunk, vla_trunk_config, wide_trunk_config

log = logging.getLogger("daptq_ros.gpu.layer_bench")

# --trunk choices: whose Linear shapes are timed and which trunk is profiled.
TRUNKS = {cfg.name: cfg for cfg in (vla_trunk_config(6), wide_trunk_config(2))}

_MATMUL_HINTS = ("gemm", "gemv", "w4a16", "w8a16", "int4pack", "splitk", "sm90_xmma", "cutlass", "nvjet",
                 "tinygemm", "_mm", "matmul")


# --impls choices: the implementations layer_rows can time.
IMPLS = ("bf16", "torch_int4_g128", "w4a16_g128", "w8a16", "w4a16_f16x2_g128")


@torch.no_grad()
def layer_rows(ms: tuple[int, ...], bw_gbs: float, trunk: TrunkConfig | None = None,
               impls: tuple[str, ...] = IMPLS) -> list[dict[str, Any]]:
    """Times of every implementation / candidate per (shape of ``trunk``'s Linears, M)."""
    dev = torch.device("cuda")
    rows: list[dict[str, Any]] = []
    for _name, n, k in (trunk or vla_trunk_config(6)).linear_shapes():
        gen = torch.Generator(device=dev).manual_seed(n + k)
        w = torch.randn(n, k, device=dev, generator=gen) * 0.02
        wb = w.to(torch.bfloat16)
        q4 = quantize_int4_groupwise(w, 128)
        q8 = quantize_int8_per_channel(w)
        qk = Int4KMajorWeight.from_int4(q4)
        lin = nn.Linear(k, n, bias=False, device=dev, dtype=torch.bfloat16)
        lin.weight.copy_(wb)
        tg = TorchInt4Linear(lin, 128).to(dev)
        for m in ms:
            x = torch.randn(m, k, device=dev, generator=gen).to(torch.bfloat16)
            base = {"N": n, "K": k, "M": m}

            def add(impl: str, cfg: str, fn, nbytes: int, ref: torch.Tensor, base=base) -> None:
                if impl not in impls:
                    return
                row = {**base, "impl": impl, "config": cfg, "bytes": nbytes}
                try:
                    row["rel_err"] = relative_error(fn(), ref)
                    row["us"] = kernels._bench_ms(fn) * 1e3
                    row["gbs"] = nbytes / (row["us"] * 1e-6) / 1e9
                    row["x_floor"] = row["us"] / (nbytes / (bw_gbs * 1e9) * 1e6)
                except Exception as exc:
                    row["error"] = f"{type(exc).__name__}: {str(exc)[:200]}"
                rows.append(row)
                print(_row_line(row), flush=True)  # streamed: a timeout keeps what was measured

            ref_b = reference_linear(x, wb.float(), None, torch.float32)
            add("bf16", "cublas", lambda x=x, wb=wb: F.linear(x, wb), wb.numel() * 2, ref_b)
            ref4 = reference_linear(x, q4.dequantize(torch.float32), None, torch.float32)
            add("torch_int4_g128", "tinygemm", lambda x=x, tg=tg: tg(x), q4.nbytes, ref4)
            for cfg in kernels.candidate_configs("w4a16", m, n, k, 128):
                add("w4a16_g128", cfg.short(),
                    lambda x=x, c=cfg, q=q4: kernels.launch_weight_only("w4a16", x, q, None, c),
                    q4.nbytes, ref4)
            for cfg in kernels.candidate_configs("w4a16_f16x2", m, n, k, 128):
                add("w4a16_f16x2_g128", cfg.short(),
                    lambda x=x, c=cfg, q=qk: kernels.launch_weight_only("w4a16_f16x2", x, q, None, c),
                    qk.nbytes, ref4)
            ref8 = reference_linear(x, q8.dequantize(torch.float32), None, torch.float32)
            for cfg in kernels.candidate_configs("w8a16", m, n, k):
                add("w8a16", cfg.short(),
                    lambda x=x, c=cfg, q=q8: kernels.launch_weight_only("w8a16", x, q, None, c),
                    q8.nbytes, ref8)
        torch.cuda.empty_cache()
    return rows


@torch.no_grad()
def profile_trunk(variant: str, m: int = 1, reps: int = 20, cfg: TrunkConfig | None = None) -> dict[str, Any]:
    """Kernel time per name of the eager trunk forward (µs per forward), matmul vs the rest."""
    from torch.profiler import ProfilerActivity, profile

    dev = torch.device("cuda")
    cfg = cfg or vla_trunk_config(6)
    model = build_trunk(cfg, dev)
    if variant != "bf16":
        model, _ = quantize_model(model, variant)
    x = torch.randn(1, m, cfg.d_model, device=dev).to(torch.bfloat16)
    for _ in range(3):
        model(x)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            model(x)
        torch.cuda.synchronize()
    per: dict[str, float] = {}
    count: dict[str, int] = {}
    for ev in prof.events():
        if ev.device_type.name != "CUDA":
            continue
        per[ev.name] = per.get(ev.name, 0.0) + ev.device_time / reps  # µs
        count[ev.name] = count.get(ev.name, 0) + 1
    kern = [{"name": k[:90], "us": v, "calls": count[k] // reps,
             "matmul": any(h in k.lower() for h in _MATMUL_HINTS)} for k, v in per.items()]
    kern.sort(key=lambda r: -r["us"])
    mm = sum(r["us"] for r in kern if r["matmul"])
    other = sum(r["us"] for r in kern if not r["matmul"])
    n_other = sum(r["calls"] for r in kern if not r["matmul"])
    del model
    torch.cuda.empty_cache()
    return {"variant": variant, "M": m, "model": cfg.name, "matmul_us": mm, "non_matmul_us": other,
            "non_matmul_kernels": n_other, "kernels": kern}


def _row_line(r: dict[str, Any]) -> str:
    if "error" in r:
        return (f"| {r['N']} | {r['K']} | {r['M']} | {r['impl']} | {r['config']} | ERROR {r['error'][:60]} "
                "| | | |")
    return (f"| {r['N']} | {r['K']} | {r['M']} | {r['impl']} | {r['config']} | {r['us']:.1f} | "
            f"{r['gbs']:.0f} | {r['x_floor']:.1f} | {r['rel_err']:.1e} |")


def _print(rows: list[dict[str, Any]], profiles: list[dict[str, Any]]) -> None:
    best: dict[tuple, dict] = {}
    for r in rows:
        if "us" in r and r["rel_err"] <= kernels.TUNE_REL_ERR_MAX:
            key = (r["N"], r["K"], r["M"], r["impl"])
            if key not in best or r["us"] < best[key]["us"]:
                best[key] = r
    if best:
        print("\n## Best per (shape, M, impl)\n")
        print("| N | K | M | impl | config | µs | GB/s | × floor |")
        print("|---|---|---|---|---|---|---|---|")
    for key in sorted(best):
        r = best[key]
        print(f"| {r['N']} | {r['K']} | {r['M']} | {r['impl']} | {r['config']} | {r['us']:.1f} | "
              f"{r['gbs']:.0f} | {r['x_floor']:.1f} |")
    for p in profiles:
        name = p.get("model", "trunk")
        print(f"\n## Eager kernel times, {name} {p['variant']} M={p['M']} (µs per forward)\n")
        if "error" in p:
            print(f"ERROR {p['error']}")
            continue
        print(f"matmul {p['matmul_us']:.1f} µs, non-matmul {p['non_matmul_us']:.1f} µs in "
              f"{p['non_matmul_kernels']} kernels\n")
        print("| kernel | calls | µs | matmul |")
        print("|---|---|---|---|")
        for r in p["kernels"][:25]:
            print(f"| {r['name']} | {r['calls']} | {r['us']:.1f} | {'y' if r['matmul'] else ''} |")
    sys.stdout.flush()


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    p = argparse.ArgumentParser(prog="python -m daptq_ros.gpu.layer_bench",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--json", type=Path, required=True)
    p.add_argument("--ms", type=int, nargs="+", default=[1, 16])
    p.add_argument("--trunk", choices=sorted(TRUNKS), default="trunk-302m",
                   help="whose Linear shapes to time and which trunk to profile")
    p.add_argument("--impls", nargs="+", choices=IMPLS, default=list(IMPLS),
                   help="implementations to time per layer (default: all)")
    p.add_argument("--no-profile", action="store_true", help="skip the eager trunk profiles")
    args = p.parse_args(argv)
    cfg = TRUNKS[args.trunk]
    if not torch.cuda.is_available():
        raise SystemExit("layer_bench needs a CUDA device")
    ceil = timing.measure_ceilings(torch.device("cuda"), copy_mib=1024, gemm_n=4096)
    profiles = []
    for variant in () if args.no_profile else ("bf16", "w4a16_g128"):
        try:
            profiles.append(profile_trunk(variant, cfg=cfg))
        except Exception as exc:
            log.exception("profile %s failed", variant)
            profiles.append({"variant": variant, "M": 1, "error": f"{type(exc).__name__}: {exc}"})
        _print([], profiles[-1:])
    print(f"\n## Per-layer candidates ({cfg.name} shapes; CUDA graph, L2 flushed, median of 25)\n")
    print("| N | K | M | impl | config | µs | GB/s | × floor | rel err |")
    print("|---|---|---|---|---|---|---|---|---|", flush=True)
    rows = layer_rows(tuple(args.ms), ceil["bw_gbs"], cfg, tuple(args.impls))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"ceilings": ceil, "machine": timing.machine_info(torch.device("cuda")),
                                     "rows": rows, "profiles": profiles}, indent=1, default=str))
    _print(rows, [])
    return 0


if __name__ == "__main__":
    sys.exit(main())
