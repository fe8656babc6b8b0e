"""`daptq demo`: the whole product on the shipped reference policy, end to end.

Stages (each is the `daptq` command a user would type; they are printed as they run):

1. ``daptq sim demos``     scripted Meta-World calibration episodes (2 per MT10 task)
2. ``daptq quantize``      DA-PTQ (config/quantize.yaml) on the shipped reference VLA
3. ``daptq export``        FP32 and quantized ONNX artifacts (model.onnx + manifest.json)
4. ``daptq bench``         ONNX Runtime latency and size, FP32 vs quantized, side by side
5. ``daptq launch policy --sim``  policy_node + sim_bridge as two ROS 2 processes over DDS,
   closed loop on the simulated robot, once with each artifact on the same seeds
6. a summary table (stdout) and ``summary.json`` in the work directory.

Re-running reuses finished stages (``--fresh`` starts over).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

HELP = "the end-to-end demo: quantize -> export -> ROS loop on the simulated robot -> summary"

ASSETS = Path(__file__).resolve().parent / "assets"
REFERENCE_CHECKPOINT = ASSETS / "reference_vla.safetensors"
DEFAULT_TASKS = "all"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--workdir", type=Path, default=Path("runs/demo"), help="where every output goes")
    parser.add_argument("--checkpoint", type=Path, default=REFERENCE_CHECKPOINT,
                        help="FP policy checkpoint (default: the shipped reference VLA)")
    parser.add_argument("--config", type=Path, default=Path("config/quantize.yaml"), help="quantize recipe")
    parser.add_argument("--tasks", default=DEFAULT_TASKS, help="MT10 tasks for the ROS loop ('all' or a,b,c)")
    parser.add_argument("--episodes", type=int, default=1, help="ROS-loop episodes per task and artifact")
    parser.add_argument("--calib-episodes", type=int, default=2, help="calibration demos per task")
    parser.add_argument("--skip-fp-loop", action="store_true",
                        help="run the ROS loop with the quantized artifact only")
    parser.add_argument("--fresh", action="store_true", help="delete the work directory first")


class StageError(RuntimeError):
    """A stage's command failed; the message names the stage and its log."""


def _daptq(*args: str) -> list[str]:
    return [sys.executable, "-m", "daptq_ros.cli", *args]


def _stage(name: str, cmd: list[str], done: Path, log_dir: Path, quiet: bool = True) -> None:
    """Run ``cmd`` unless ``done`` exists; its output goes to ``log_dir/name.log`` (or stdout)."""
    shown = " ".join(shlex.quote(c) for c in ["daptq", *cmd[3:]])
    if done.exists():
        print(f"[demo] {name}: done already ({done})", flush=True)
        return
    print(f"[demo] {name}: {shown}", flush=True)
    log = log_dir / f"{name}.log"
    t0 = time.perf_counter()
    # One torch/OpenMP thread per process: the stages overlap with node and worker processes on
    # small machines, and oversubscribed torch threads were measured 10-50x slower (quantize:
    # 27 min with 2 threads under load vs ~2 min with 1).
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    with log.open("w") as fh:
        proc = subprocess.run(cmd, stdout=fh if quiet else None, stderr=fh, check=False, env=env)
    if proc.returncode != 0:
        tail = "".join(log.read_text(errors="replace").splitlines(keepends=True)[-15:])
        raise StageError(f"stage {name!r} failed (exit {proc.returncode}); log {log}:\n{tail}")
    if not done.exists():
        raise StageError(f"stage {name!r} finished but did not produce {done}; log {log}")
    print(f"[demo] {name}: ok in {time.perf_counter() - t0:.0f} s", flush=True)


def _load(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())


def _fmt(value: Any, spec: str, missing: str = "-") -> str:
    return missing if value is None else format(value, spec)


def summary_table(rows: list[dict[str, Any]]) -> str:
    """Markdown table of the FP32 and quantized artifacts side by side."""
    header = ("| artifact | avg weight bits | model.onnx MB | ORT CPU median / p99 ms | latency ratio "
              "| ROS-loop success | loop latency ms | missed steps |")
    lines = [header, "|---" * (header.count("|") - 1) + "|"]
    for r in rows:
        success = ("-" if r.get("episodes") is None
                   else f"{r['successes']}/{r['episodes']} ({r['successes'] / max(r['episodes'], 1):.0%})")
        lines.append(
            f"| {r['name']} | {_fmt(r.get('avg_bits'), '.2f')} | {_fmt(r.get('mb'), '.2f')} "
            f"| {_fmt(r.get('median_ms'), '.1f')} / {_fmt(r.get('p99_ms'), '.1f')} "
            f"| {_fmt(r.get('latency_ratio'), '.2f')} | {success} | {_fmt(r.get('loop_ms'), '.1f')} "
            f"| {_fmt(r.get('missed'), 'd')} |"
        )
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    work: Path = args.workdir
    if not args.checkpoint.is_file():
        logger.error("checkpoint not found: %s", args.checkpoint)
        return 2
    if args.fresh and work.exists():
        shutil.rmtree(work)
    logs = work / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    calib, quant = work / "calib_demos", work / "quantized"
    art_fp, art_q = work / "artifact_fp32", work / "artifact_daptq"
    t0 = time.perf_counter()
    qjson, bjson = work / "quantize.json", work / "bench.json"
    try:
        _stage("demos", _daptq("sim", "demos", "--out", str(calib), "--tasks", "all",
                               "--episodes-per-task", str(args.calib_episodes), "--workers", "2",
                               "--json", str(work / "demos.json")),
               work / "demos.json", logs)
        _stage("quantize", _daptq("quantize", "--config", str(args.config),
                                  "--checkpoint", str(args.checkpoint), "--demos", str(calib),
                                  "--out", str(quant), "--json", str(qjson)),
               qjson, logs)
        _stage("export-fp32", _daptq("export", "--checkpoint", str(args.checkpoint), "--out", str(art_fp)),
               art_fp / "manifest.json", logs)
        _stage("export-daptq", _daptq("export", "--quantized", _load(qjson)["checkpoint"],
                                      "--out", str(art_q), "--flavour", "cpu"),
               art_q / "manifest.json", logs)
        _stage("bench", _daptq("bench", "--artifacts", str(art_fp), str(art_q), "--runs", "200",
                               "--warmup", "20", "--json", str(bjson)),
               bjson, logs)
        loops = [("daptq", art_q)] + ([] if args.skip_fp_loop else [("fp32", art_fp)])
        for name, art in loops:
            out = work / f"ros_loop_{name}.json"
            _stage(f"ros-loop-{name}", _daptq("launch", "policy", "--sim", "--artifact", str(art),
                                              "--tasks", args.tasks, "--episodes", str(args.episodes),
                                              "--log-dir", str(logs / f"nodes-{name}"), "--json", str(out)),
                   out, logs)
    except StageError as err:
        logger.error("%s", err)
        return 1

    quant_summary = _load(qjson)
    bench = {Path(r["artifact"]).name: r for r in _load(bjson)["results"]}
    rows = []
    for name, art in (("fp32", art_fp), ("daptq", art_q)):
        b = bench.get(art.name, {})
        row: dict[str, Any] = {
            "name": f"{name} ({art})",
            "avg_bits": 32.0 if name == "fp32" else quant_summary.get("avg_bits"),
            "mb": b.get("model_bytes", 0) / 1e6 if b else None,
            "median_ms": b.get("median_ms"),
            "p99_ms": b.get("p99_ms"),
            "latency_ratio": b.get("latency_ratio"),
        }
        loop_path = work / f"ros_loop_{name}.json"
        if loop_path.exists():
            s = _load(loop_path).get("summary") or {}
            row.update(episodes=s.get("episodes"), successes=s.get("successes"),
                       loop_ms=s.get("mean_loop_latency_ms"), missed=s.get("missed_steps"))
        rows.append(row)
    table = summary_table(rows)
    machine = _load(bjson).get("machine", {})
    print()
    print(f"DA-PTQ demo on the shipped reference VLA ({args.checkpoint.name}); "
          f"drift loss on calibration frames: {quant_summary.get('drift_loss'):.4g}; "
          f"quantize report: {quant_summary.get('report')}")
    print(table)
    print(f"machine: {machine.get('cpu', machine.get('cpu_model', '?'))}, {machine.get('cores', '?')} cores, "
          f"onnxruntime {machine.get('onnxruntime', '?')}; total {time.perf_counter() - t0:.0f} s; "
          f"everything under {work}/")
    (work / "summary.json").write_text(json.dumps({"rows": rows, "quantize": quant_summary,
                                                   "machine": machine}, indent=2))
    return 0
