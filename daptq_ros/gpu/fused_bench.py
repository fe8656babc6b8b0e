"""Ablation of the fused one-token trunk kernel, side by side with bf16 and the per-Linear f16x2 trunk.

Run on the GPU machine::

    PYTHONPATH=. python3 -m daptq_ros.gpu.fused_bench --json $OUT/fused.json

For each trunk (default ``trunk-315m-d4096``) and, in one process, on the same inputs: the bf16
trunk (``torch.compile``), the ``w4a16_f16x2_g128`` trunk (compiled; its Linears are our GEMV)
and :class:`~daptq_ros.gpu.fused.FusedTrunk` under each :class:`~daptq_ros.gpu.fused.FusedConfig`
of the grid — persistent vs one launch per phase, L2 prefetch distance, tile width, warps,
programs per SM. Every configuration is checked against the float32 reference first; latency is
the median of CUDA-graph replays (:func:`daptq_ros.gpu.timing.time_graphs`), ratios are to the
bf16 time and to the int4 bandwidth floor measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch

from daptq_ros.gpu import report, timing
from daptq_ros.gpu.fused import FusedConfig, FusedTrunk
from daptq_ros.gpu.linear import quantize_model, reference_model, weight_nbytes
from daptq_ros.gpu.packing import relative_error
from daptq_ros.gpu.trunk import vla_trunk_config, wide_trunk_config

log = logging.getLogger("daptq_ros.gpu.fused_bench")

TRUNKS = {"trunk-315m-d4096": lambda: wide_trunk_config(2), "trunk-302m": lambda: vla_trunk_config(6),
          "trunk-1007m": lambda: vla_trunk_config(20)}
BASE = FusedConfig()
# One change at a time from the default, plus the per-phase launch of the default.
GRID = [BASE, replace(BASE, persistent=False), replace(BASE, pf_ahead=1), replace(BASE, pf_ahead=2),
        replace(BASE, pf_ahead=1, pf_chunks=1), replace(BASE, pf_ahead=1, pf_chunks=64),
        replace(BASE, pf_ahead=1, pf_chunks=0), replace(BASE, depth=1), replace(BASE, depth=1, pf_ahead=1),
        replace(BASE, block_n=128, pf_ahead=1), replace(BASE, block_n=128, num_warps=4, programs_per_sm=2),
        replace(BASE, block_n=512, num_warps=16), replace(BASE, block_n=512, depth=1, pf_ahead=1),
        replace(BASE, depth=3), replace(BASE, depth=3, pf_ahead=1)]


def _label(cfg: FusedConfig) -> str:
    return (f"{'persistent' if cfg.persistent else 'per-phase'} pf{cfg.pf_ahead}/{cfg.pf_chunks} "
            f"n{cfg.block_n} d{cfg.depth} w{cfg.num_warps}x{cfg.programs_per_sm}")


def _time(fn, inputs, dev, replays: int) -> dict[str, float]:
    return timing.time_graphs(fn, inputs, dev, replays=replays, warmup=20)


@torch.no_grad()
def run_trunk(name: str, dev: torch.device, bw_gbs: float, replays: int,
              grid: list[FusedConfig]) -> list[dict]:
    """All rows of one trunk (errors recorded per row, never raised)."""
    from daptq_ros.gpu.trunk import build_trunk

    cfg = TRUNKS[name]()
    base = build_trunk(cfg, dev)
    gen = torch.Generator(device=dev).manual_seed(0)
    inputs = [torch.randn(1, 1, cfg.d_model, device=dev, generator=gen).to(torch.bfloat16) for _ in range(4)]
    check = torch.randn(1, 1, cfg.d_model, device=dev, generator=gen).to(torch.bfloat16)
    rows: list[dict[str, Any]] = []

    def add(variant: str, model, ref, timed, extra: dict | None = None) -> None:
        row = {"model": name, "variant": variant, "weight_bytes": weight_nbytes(model), **(extra or {})}
        try:
            row["rel_err"] = relative_error(timed(check).float(), ref(check.float()))
            t = _time(timed, inputs, dev, replays)
            row.update(trunk_ms=t["median_ms"], p10_ms=t["p10_ms"], p90_ms=t["p90_ms"], graphs=t["graphs"])
        except Exception as exc:
            log.exception("%s %s failed", name, variant)
            row["error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
        row["floor_ms"] = report.bandwidth_floor_ms(row["weight_bytes"], bw_gbs)
        rows.append(row)
        log.info("%s %-40s %s ms  err %s", name, variant, row.get("trunk_ms"), row.get("rel_err"))

    ref_bf16 = reference_model(base)
    add("bf16 (compiled)", base, ref_bf16, torch.compile(base, dynamic=False))
    del ref_bf16
    f16x2, _ = quantize_model(base, "w4a16_f16x2_g128")
    ref = reference_model(f16x2)
    from daptq_ros.gpu.bench import _compiled  # the benchmark's own compile wrapper

    add("w4a16_f16x2_g128 (compiled)", f16x2, ref, _compiled(f16x2))
    for fcfg in grid:
        try:
            fused = FusedTrunk(f16x2, fcfg)
        except Exception as exc:
            rows.append({"model": name, "variant": "fused " + _label(fcfg), "error": str(exc)})
            continue
        add("fused " + _label(fcfg), fused, ref, fused, {"config": asdict(fcfg)})
        del fused
        torch.cuda.empty_cache()
    add("bf16 (compiled, again)", base, reference_model(base), torch.compile(base, dynamic=False))
    bf16 = rows[0].get("trunk_ms")
    for r in rows:
        r["speedup"] = report.ratio(bf16, r.get("trunk_ms"))
        r["x_floor"] = report.ratio(r.get("trunk_ms"), r["floor_ms"])
    return rows


def _table(rows: list[dict]) -> str:
    lines = ["| model | variant | ms | × bf16 | × floor | floor ms | rel err |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        def f(key: str, spec: str, r: dict = r) -> str:
            return "–" if r.get(key) is None else format(r[key], spec)

        lines.append(f"| {r['model']} | {r['variant']} | {f('trunk_ms', '.4f')} | {f('speedup', '.2f')} | "
                     f"{f('x_floor', '.2f')} | {f('floor_ms', '.4f')} | {f('rel_err', '.1e')} |"
                     + (f" {r['error'][:60]}" if r.get("error") else ""))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run the ablation; prints a markdown table and writes JSON."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    p = argparse.ArgumentParser(prog="python -m daptq_ros.gpu.fused_bench",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--json", type=Path, required=True, help="where to write the rows")
    p.add_argument("--trunks", nargs="+", default=["trunk-315m-d4096"], choices=sorted(TRUNKS))
    p.add_argument("--replays", type=int, default=400, help="timed graph replays per row")
    p.add_argument("--default-only", action="store_true", help="only the default FusedConfig (no ablation)")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA device: the fused trunk benchmark needs the GPU machine")
    dev = torch.device("cuda")
    info = timing.machine_info(dev)
    ceilings = timing.measure_ceilings(dev)
    grid = [BASE] if args.default_only else GRID
    rows = []
    for name in args.trunks:
        rows += run_trunk(name, dev, ceilings["bw_gbs"], args.replays, grid)
        torch.cuda.empty_cache()
    args.json.parent.mkdir(parents=True, exist_ok=True)
    doc = {"machine": info, "ceilings": ceilings, "rows": rows}
    args.json.write_text(json.dumps(doc, indent=1, default=str))
    print(f"\nMachine: {info.get('gpu')} | torch {info['torch']} | triton {info.get('triton')} | "
          f"floor at {ceilings['bw_gbs']:.0f} GB/s\n")
    print(_table(rows), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
