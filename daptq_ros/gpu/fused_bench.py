"""Ablation of the fused one-token trunk kernel, side by side with bf16 and the per-Linear f16x2 trunk.

Run on the GPU machine::

    PYTHONPATH=. python3 -m daptq_ros.gpu.fused_bench --json $OUT/fused.json

For each trunk (default ``trunk-315m-d4096``) and, in one process, on the same inputs: the bf16
trunk (``torch.compile``), the ``w4a16_f16x2_g128`` trunk (compiled; its Linears are our GEMV)
and :class:`~daptq_ros.gpu.fused.FusedTrunk` under each :class:`~daptq_ros.gpu.fused.FusedConfig`
of the grid — persistent vs one launch per phase, the 4-word dot, tile width, warps, programs
per SM. Every configuration is checked against the float32 reference first; latency is
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
# One change at a time from the default (the gated TMA ring), the eighth run's default, then the
# Triton register-ring kernel and its per-phase ablation.
GRID = [BASE, replace(BASE, gate_late=False), replace(BASE, gate=0), replace(BASE, stages=4),
        replace(BASE, ws=False), replace(BASE, one_rt=False, ahead=False, keep_l2=False, gate=0, stages=4),
        replace(BASE, tma=False), replace(BASE, tma=False, persistent=False)]


def _label(cfg: FusedConfig) -> str:
    if cfg.tma:
        gate = cfg.active_gate
        knobs = (("ws", cfg.ws), ("1rt", cfg.one_rt), ("ahead", cfg.ahead), ("keep", cfg.keep_l2),
                 (f"gate{gate}", gate), ("late", gate and cfg.gate_late))
        flags = [f"tma{cfg.stages}", *(name for name, on in knobs if on)]
    else:  # the Triton kernel's own knobs
        flags = [name for name, on in (("quad", cfg.quad), ("early", cfg.early_arrive),
                                       ("lnsub", cfg.ln_subset), (f"l2+{cfg.l2_ahead}", cfg.l2_ahead)) if on]
    return (f"{'persistent' if cfg.persistent else 'per-phase'} n{cfg.block_n} "
            f"w{cfg.num_warps}x{cfg.programs_per_sm} {' '.join(flags)}")


def parse_config(text: str) -> FusedConfig:
    """``"quad=0,block_n=512"`` → the default :class:`FusedConfig` with those fields changed (an
    unknown field or a bad value is an error naming it)."""
    fields = {f: type(v) for f, v in asdict(BASE).items()}
    changes: dict[str, Any] = {}
    for item in filter(None, (t.strip() for t in text.split(","))):
        key, sep, value = item.partition("=")
        if not sep or key not in fields:
            raise argparse.ArgumentTypeError(f"--config: unknown field {key!r} (fields: {', '.join(fields)})")
        try:
            changes[key] = bool(int(value)) if fields[key] is bool else fields[key](value)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(f"--config: bad value for {key}: {value!r}") from exc
    try:
        return replace(BASE, **changes)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"--config {text!r}: {exc}") from exc


def _time(fn, inputs, dev, replays: int) -> dict[str, float]:
    return timing.time_graphs(fn, inputs, dev, replays=replays, warmup=20)


def _trace_table(name: str, label: str, tr: dict) -> str:
    lines = [f"{name}, {label}: {tr['programs']} programs, traced forward {tr['total_us']:.1f} µs "
             f"(median of {tr['repeats']})", "",
             "| phase | starts at µs | span µs | prologue µs (med / max) | GEMV µs (med / max) | "
             "barrier wait µs (med / max) | GEMV GB/s |", "|---|---|---|---|---|---|---|"]
    for ph in tr["phases"]:
        gbs = "–" if ph.get("gemv_gbs") is None else f"{ph['gemv_gbs']:.0f}"
        lines.append(f"| {ph['phase']} | {ph['start']:.1f} | {ph['span']:.1f} | {ph['prologue_med']:.1f} / "
                     f"{ph['prologue_max']:.1f} | {ph['gemv_med']:.1f} / {ph['gemv_max']:.1f} | "
                     f"{ph['wait_med']:.1f} / {ph['wait_max']:.1f} | {gbs} |")
    return "\n".join(lines)


def plot_trace(tr: dict, path: Path) -> Path | None:
    """One horizontal bar per phase, on the forward's time axis: median prologue, GEMV and barrier
    wait of the programs (the GEMV bar labelled with its GB/s). Returns the path, or None without
    matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception as exc:
        log.info("no trace plot: matplotlib unavailable (%s)", exc)
        return None
    phases = tr["phases"]
    fig, ax = plt.subplots(figsize=(8, 0.45 * len(phases) + 1.4))
    parts = (("prologue_med", "prologue", "C1"), ("gemv_med", "GEMV", "C0"),
             ("wait_med", "barrier wait", "C7"))
    for i, ph in enumerate(phases):
        left = ph["start"]
        for key, label, color in parts:
            ax.barh(i, ph[key], left=left, color=color, label=label if i == 0 else None)
            if key == "gemv_med" and ph.get("gemv_gbs"):
                ax.text(left + ph[key] / 2, i, f"{ph['gemv_gbs'] / 1e3:.1f} TB/s", ha="center", va="center",
                        fontsize=7, color="white")
            left += ph[key]
    ax.set_yticks(range(len(phases)), [ph["phase"] for ph in phases])
    ax.invert_yaxis()
    ax.set_xlabel("µs from the first program's start (medians over programs)")
    ax.set_title(f"{tr['model']}, {tr['label']}\n{tr['total_us']:.1f} µs traced, {tr['programs']} programs",
                 fontsize=10)
    ax.legend(fontsize=8, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


@torch.no_grad()
def trace_trunk(name: str, dev: torch.device, configs: list[FusedConfig]) -> list[dict]:
    """Per-phase timelines (:meth:`FusedTrunk.trace`) of the persistent configs."""
    from daptq_ros.gpu.trunk import build_trunk

    cfg = TRUNKS[name]()
    f16x2, _ = quantize_model(build_trunk(cfg, dev), "w4a16_f16x2_g128")
    x = torch.randn(1, 1, cfg.d_model, device=dev, generator=torch.Generator(device=dev).manual_seed(0))
    out = []
    for fcfg in configs:
        if not fcfg.persistent:
            continue
        try:
            tr = FusedTrunk(f16x2, fcfg).trace(x.to(torch.bfloat16))
        except Exception as exc:
            log.exception("trace %s failed", _label(fcfg))
            out.append({"model": name, "config": asdict(fcfg), "error": f"{type(exc).__name__}: {exc}"})
            continue
        out.append({"model": name, "label": _label(fcfg), "config": asdict(fcfg), **tr})
        print("\n" + _trace_table(name, _label(fcfg), tr), flush=True)
    return out


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


def _write_trace_plots(traces: list[dict], json_path: Path) -> int:
    """``<json stem>_trace<i>.png`` beside the JSON for every recorded timeline."""
    for i, tr in enumerate(t for t in traces if "phases" in t):
        out = plot_trace(tr, json_path.with_name(f"{json_path.stem}_trace{i}.png"))
        if out:
            print(f"timeline plot: {out}")
    return 0


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
    p.add_argument("--config", dest="configs", action="append", type=parse_config, metavar="FIELD=V,...",
                   help="a FusedConfig to run instead of the ablation grid (repeatable; '' = the default)")
    p.add_argument("--trace", type=int, default=0, metavar="N",
                   help="also record per-phase timelines (%%globaltimer stamps) of the first N persistent "
                        "configs")
    p.add_argument("--trace-only", action="store_true", help="only the timelines, no latency table")
    p.add_argument("--replot", action="store_true",
                   help="no GPU run: redraw the timeline plots of the JSON that --json names")
    args = p.parse_args(argv)
    if args.replot:
        return _write_trace_plots(json.loads(args.json.read_text())["traces"], args.json)
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA device: the fused trunk benchmark needs the GPU machine")
    dev = torch.device("cuda")
    info = timing.machine_info(dev)
    ceilings = timing.measure_ceilings(dev)
    grid = args.configs or ([BASE] if args.default_only else GRID)
    rows, traces = [], []
    for name in args.trunks:
        if args.trace or args.trace_only:
            traces += trace_trunk(name, dev, [c for c in grid if c.persistent][:args.trace or len(grid)])
        if not args.trace_only:
            rows += run_trunk(name, dev, ceilings["bw_gbs"], args.replays, grid)
        torch.cuda.empty_cache()
    args.json.parent.mkdir(parents=True, exist_ok=True)
    doc = {"machine": info, "ceilings": ceilings, "rows": rows, "traces": traces}
    args.json.write_text(json.dumps(doc, indent=1, default=str))
    _write_trace_plots(traces, args.json)
    print(f"\nMachine: {info.get('gpu')} | torch {info['torch']} | triton {info.get('triton')} | "
          f"floor at {ceilings['bw_gbs']:.0f} GB/s\n")
    print(_table(rows), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
