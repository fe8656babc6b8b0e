"""`daptq bench`: side-by-side batch-1 ONNX Runtime latency, size and memory of artifacts.

All artifacts are measured in one process, in interleaved rounds (so background load hits every
artifact alike), after a warm-up. Ratios are relative to the first artifact (normally FP32):
``latency ratio`` is the median over rounds of (artifact median / first median) within the same
round, which cancels load that changes between rounds; ``speed-up`` is the ratio of the overall
medians. ``CPU ms`` / ``CPU-time ratio`` use the process CPU time of each run (paired the same
way): on a shared, loaded machine it excludes the time the run waited for a core, so with
``--threads 1`` it is the steadier measure (with more threads ORT's spinning workers inflate it).
``size / FP16`` compares each model file with the first artifact's graph re-serialized
with float16 initializers (what an FP16 export would weigh). Example::

    daptq bench --artifacts artifacts/fp32 artifacts/w8a8 artifacts/w4a8 artifacts/mixed \
        --runs 400 --rounds 40 --threads 1 --json bench.json
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import resource
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from daptq_ros.runtime.manifest import MODEL_NAME
from daptq_ros.runtime.session import PolicySession

logger = logging.getLogger(__name__)

HELP = "side-by-side latency/size benchmarks (ONNX Runtime CPU, torch GPU)"
# Op types worth showing from the ORT-optimized graph (quantized kernels vs runtime dequantize).
KERNEL_OPS = (
    "DequantizeLinear",
    "QuantizeLinear",
    "MatMulIntegerToFloat",
    "DynamicQuantizeMatMul",
    "MatMulNBits",
    "ConvInteger",
    "QLinearConv",
    "QLinearMatMul",
    "MatMul",
    "FusedMatMul",
    "Gemm",
    "Conv",
)


@dataclass
class BenchResult:
    """Measurements of one artifact (latencies in milliseconds)."""

    artifact: str
    method: str
    flavour: str
    avg_bits: float
    provider: str
    model_bytes: int
    runs: int
    median_ms: float
    p99_ms: float
    mean_ms: float
    min_ms: float
    peak_rss_delta_mb: float
    speedup_vs_first: float = 1.0
    size_ratio_vs_first: float = 1.0
    size_vs_fp16: float = float("nan")
    latency_ratio: float = 1.0
    latency_ratio_p25: float = 1.0
    latency_ratio_p75: float = 1.0
    cpu_median_ms: float = float("nan")
    cpu_ratio: float = 1.0
    kernels: dict[str, int] = field(default_factory=dict)
    runtime_ops: dict[str, int] = field(default_factory=dict)
    latencies_ms: list[float] = field(default_factory=list, repr=False)


def machine_info(provider: str | None = None) -> dict[str, Any]:
    """CPU model, cores, OS, Python and ONNX Runtime versions."""
    import onnxruntime as ort

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    flags = ""
    try:
        text = Path("/proc/cpuinfo").read_text()
        flags = " ".join(f for f in ("avx2", "avx512f", "avx512_vnni", "avx_vnni") if f" {f}" in text)
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cpu_flags": flags,
        "cores": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "onnxruntime": ort.__version__,
        "provider": provider,
    }


def _rss_kb(field_name: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_peak_rss() -> bool:
    """Reset VmHWM (Linux >= 4.0) so the next peak reading belongs to one artifact."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def runtime_op_counts(artifact: str | Path, threads: int | None = 1) -> dict[str, int]:
    """Op types of the graph ORT-CPU actually runs (after its graph optimizations).

    Shows whether quantized layers became integer kernels (MatMulIntegerToFloat, MatMulNBits, ...)
    or stayed ``DequantizeLinear`` + float ops executed at every inference.
    """
    import tempfile

    import onnx
    import onnxruntime as ort

    from daptq_ros.runtime.session import QDQ_DISABLED_OPTIMIZERS

    with tempfile.TemporaryDirectory() as tmp:
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        if threads is not None:
            opts.intra_op_num_threads = int(threads)
        opts.optimized_model_filepath = str(Path(tmp) / "optimized.onnx")
        ort.InferenceSession(
            str(Path(artifact) / MODEL_NAME),
            opts,
            providers=["CPUExecutionProvider"],
            disabled_optimizers=list(QDQ_DISABLED_OPTIMIZERS),
        )
        graph = onnx.load(opts.optimized_model_filepath, load_external_data=False).graph
    counts: dict[str, int] = {}
    for node in graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return dict(sorted(counts.items(), key=lambda kv: -kv[1]))


def _fp16_bytes(artifact: str | Path) -> int:
    import onnx

    from daptq_ros.export.onnx_export import fp16_export_bytes

    return fp16_export_bytes(onnx.load(str(Path(artifact) / MODEL_NAME)))


def _random_feeds(session: PolicySession, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    feeds = {}
    for spec in session.manifest.inputs:
        if spec.name == "image":
            feeds[spec.name] = rng.random(spec.shape, dtype=np.float32)
        elif spec.name == "lang_mask":
            mask = np.zeros(spec.shape, np.float32)
            mask[..., :8] = 1.0
            feeds[spec.name] = mask
        else:
            feeds[spec.name] = rng.standard_normal(spec.shape).astype(np.dtype(spec.dtype))
    return feeds


def benchmark(
    artifacts: list[str | Path],
    runs: int = 200,
    warmup: int = 20,
    threads: int | None = None,
    rounds: int = 20,
    providers: list[str] | None = None,
    runtime_ops: bool = False,
) -> tuple[list[BenchResult], dict[str, Any]]:
    """Measure every artifact; returns per-artifact results and the machine description.

    Args:
        artifacts: artifact directories; the first is the reference for the ratios.
        runs: timed batch-1 runs per artifact (split across ``rounds``).
        warmup: untimed runs per artifact before timing.
        threads: ORT intra-op threads (None = ORT default).
        rounds: interleaving rounds (every artifact runs ``runs / rounds`` times per round).
        providers: allowed execution providers (default TensorRT > CUDA > CPU).
        runtime_ops: also record the op types of the ORT-optimized graph (CPU provider).
    """
    if runs < 1 or warmup < 0 or rounds < 1:
        raise ValueError(f"runs must be >= 1, warmup >= 0 and rounds >= 1; got {runs}, {warmup}, {rounds}")
    if not artifacts:
        raise ValueError("no artifacts given")
    sessions, feeds, rss = [], [], []
    for i, path in enumerate(artifacts):
        reset = _reset_peak_rss()
        before = _rss_kb("VmRSS") if reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        session = PolicySession(path, providers=providers, threads=threads)
        feed = _random_feeds(session, seed=i)
        for _ in range(max(warmup, 1)):
            session.run(feed)
        after = _rss_kb("VmHWM") if reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        rss.append(((after or 0) - (before or 0)) / 1024.0)
        sessions.append(session)
        feeds.append(feed)
    lat: list[list[float]] = [[] for _ in sessions]
    cpu: list[list[float]] = [[] for _ in sessions]
    round_medians: list[list[float]] = [[] for _ in sessions]
    round_cpu: list[list[float]] = [[] for _ in sessions]
    per_round = [runs // rounds + (1 if r < runs % rounds else 0) for r in range(rounds)]
    for n in per_round:
        if n == 0:
            continue
        for idx, session in enumerate(sessions):
            times, cpu_times = [], []
            for _ in range(n):
                start, cpu_start = time.perf_counter(), time.process_time()
                session.run(feeds[idx])
                cpu_times.append((time.process_time() - cpu_start) * 1e3)
                times.append((time.perf_counter() - start) * 1e3)
            lat[idx].extend(times)
            cpu[idx].extend(cpu_times)
            round_medians[idx].append(float(np.median(times)))
            round_cpu[idx].append(float(np.median(cpu_times)))
    results = []
    for idx, (path, session, times, mem) in enumerate(zip(artifacts, sessions, lat, rss, strict=True)):
        arr = np.asarray(times)
        m = session.manifest
        paired = np.asarray(round_medians[idx]) / np.asarray(round_medians[0])
        paired_cpu = np.asarray(round_cpu[idx]) / np.asarray(round_cpu[0])
        cpu_kernels = m.config.get("cpu_kernels") if isinstance(m.config, dict) else None
        kernels: dict[str, int] = {}
        for kernel in (cpu_kernels or {}).values():
            kernels[str(kernel)] = kernels.get(str(kernel), 0) + 1
        results.append(
            BenchResult(
                artifact=str(path),
                method=m.method,
                flavour=m.flavour,
                avg_bits=m.avg_bits,
                provider=session.provider,
                model_bytes=(Path(path) / MODEL_NAME).stat().st_size,
                runs=len(arr),
                median_ms=float(np.median(arr)),
                p99_ms=float(np.percentile(arr, 99)),
                mean_ms=float(arr.mean()),
                min_ms=float(arr.min()),
                peak_rss_delta_mb=mem,
                latency_ratio=float(np.median(paired)),
                latency_ratio_p25=float(np.percentile(paired, 25)),
                latency_ratio_p75=float(np.percentile(paired, 75)),
                cpu_median_ms=float(np.median(cpu[idx])),
                cpu_ratio=float(np.median(paired_cpu)),
                kernels=kernels,
                runtime_ops=runtime_op_counts(path, threads) if runtime_ops else {},
                latencies_ms=[round(t, 4) for t in times],
            )
        )
    first = results[0]
    fp16 = _fp16_bytes(artifacts[0]) if first.flavour == "fp32" else None
    for r in results:
        r.speedup_vs_first = first.median_ms / r.median_ms
        r.size_ratio_vs_first = r.model_bytes / first.model_bytes
        if fp16:
            r.size_vs_fp16 = r.model_bytes / fp16
    return results, machine_info(sessions[0].provider)


def _kernel_ops(counts: dict[str, int]) -> dict[str, int]:
    return {op: counts[op] for op in KERNEL_OPS if counts.get(op)}


def markdown_table(results: list[BenchResult], machine: dict[str, Any], threads: int | None) -> str:
    """Human summary: a markdown table plus the machine line."""
    lines = [
        f"Machine: {machine['cpu']} ({machine['cpu_flags'] or 'no AVX flags found'}), "
        f"{machine['cores']} cores, "
        f"onnxruntime {machine['onnxruntime']}, {machine['provider']}, threads={threads or 'default'}",
        "",
        "| artifact | method | flavour | avg bits | size KiB | size ratio | size / FP16 | median ms | "
        "p99 ms | latency ratio [p25-p75] | CPU ms | CPU-time ratio | speed-up | peak RSS MB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        fp16 = f"{r.size_vs_fp16:.3f}" if np.isfinite(r.size_vs_fp16) else "-"
        lines.append(
            f"| {Path(r.artifact).name} | {r.method} | {r.flavour} | {r.avg_bits:.2f} | "
            f"{r.model_bytes / 1024:.0f} | {r.size_ratio_vs_first:.3f} | {fp16} | "
            f"{r.median_ms:.3f} | {r.p99_ms:.3f} | "
            f"{r.latency_ratio:.3f} [{r.latency_ratio_p25:.3f}-{r.latency_ratio_p75:.3f}] | "
            f"{r.cpu_median_ms:.3f} | {r.cpu_ratio:.3f} | "
            f"{r.speedup_vs_first:.2f}x | {r.peak_rss_delta_mb:.1f} |"
        )
    kernel_lines = [
        f"- {Path(r.artifact).name}: kernels {r.kernels or '-'}"
        + (f"; ORT runs {_kernel_ops(r.runtime_ops)}" if r.runtime_ops else "")
        for r in results
        if r.kernels or r.runtime_ops
    ]
    if kernel_lines:
        lines += ["", *kernel_lines]
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--artifacts",
        nargs="+",
        type=Path,
        required=True,
        help="artifact directories; the first (normally FP32) is the reference",
    )
    parser.add_argument("--runs", type=int, default=200, help="timed runs per artifact (>= 200 recommended)")
    parser.add_argument("--warmup", type=int, default=20, help="untimed warm-up runs per artifact")
    parser.add_argument("--threads", type=int, default=None, help="ORT intra-op threads (default: ORT's)")
    parser.add_argument(
        "--rounds", type=int, default=20, help="interleaved measurement rounds (paired ratios per round)"
    )
    parser.add_argument(
        "--providers",
        nargs="+",
        default=None,
        help="allowed execution providers (tensorrt, cuda, cpu); default all present",
    )
    parser.add_argument(
        "--runtime-ops",
        action="store_true",
        help="also list the op types ORT-CPU runs after graph optimization (fused kernels vs DQ)",
    )
    parser.add_argument("--json", type=Path, default=None, help="write results (with raw latencies) here")


def run(args: argparse.Namespace) -> int:
    """Benchmark and print the table; returns 2 for a bad artifact."""
    from daptq_ros.runtime.manifest import ManifestError
    from daptq_ros.runtime.session import ArtifactError

    try:
        results, machine = benchmark(
            args.artifacts,
            runs=args.runs,
            warmup=args.warmup,
            threads=args.threads,
            rounds=args.rounds,
            providers=args.providers,
            runtime_ops=args.runtime_ops,
        )
    except (ArtifactError, ManifestError, ValueError) as err:
        logger.error("bench failed: %s", err)
        return 2
    print(markdown_table(results, machine, args.threads))
    if args.json:
        payload = {
            "machine": machine,
            "threads": args.threads,
            "runs": args.runs,
            "warmup": args.warmup,
            "rounds": args.rounds,
            "results": [asdict(r) for r in results],
        }
        args.json.write_text(json.dumps(payload, indent=2) + "\n")
    return 0
