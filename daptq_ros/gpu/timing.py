"""Device measurements for the GPU benchmark: ceilings, CUDA-graph latency, machine info.

Method (``.library/device/METHOD.md``): the two ceilings are measured once on the device
(a large device-to-device copy counting bytes read plus written, a plain streaming read, and a
large bf16 matrix product on random data); latencies are CUDA-graph replays timed one by one with
CUDA events after warm-up, the median over ≥ 200 replays, rotating among several captured input
sets so that no replay reuses the previous one's input. Without CUDA (tests, interpreter smoke
runs) the same functions fall back to host timers around eager calls.
"""

from __future__ import annotations

import logging
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

log = logging.getLogger(__name__)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _event_times_ms(fn: Callable[[], Any], reps: int, device: torch.device) -> list[float]:
    """Per-call times of ``fn`` (CUDA events on GPU, perf_counter elsewhere)."""
    if device.type != "cuda":
        out = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            out.append((time.perf_counter() - t0) * 1e3)
        return out
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    for s, e in zip(starts, ends, strict=True):
        s.record()
        fn()
        e.record()
    torch.cuda.synchronize(device)
    return [s.elapsed_time(e) for s, e in zip(starts, ends, strict=True)]


@torch.no_grad()
def measure_ceilings(device: torch.device, copy_mib: int = 1024, gemm_n: int = 8192) -> dict[str, float]:
    """Measure streaming bandwidth and bf16 matmul rate on ``device``.

    Returns:
        ``copy_gbs`` (device-to-device copy, read + write bytes), ``read_gbs`` (sum over a large
        buffer, bytes read), ``bw_gbs`` (the larger of the two: the optimistic rate the floor uses),
        ``gemm_tflops`` (bf16 ``gemm_n``³ matmul on random data).
    """
    n_bytes = copy_mib * 2**20
    src = torch.randn(n_bytes // 4, device=device, dtype=torch.float32)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    copy_ms = statistics.median(_event_times_ms(lambda: dst.copy_(src), 20, device))
    read_ms = statistics.median(_event_times_ms(lambda: src.sum(), 20, device))
    a = torch.randn(gemm_n, gemm_n, device=device, dtype=torch.bfloat16)
    b = torch.randn(gemm_n, gemm_n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    gemm_ms = statistics.median(_event_times_ms(lambda: a @ b, 10, device))
    copy_gbs = 2 * n_bytes / (copy_ms * 1e-3) / 1e9
    read_gbs = n_bytes / (read_ms * 1e-3) / 1e9
    out = {"copy_gbs": copy_gbs, "read_gbs": read_gbs, "bw_gbs": max(copy_gbs, read_gbs),
           "gemm_tflops": 2 * gemm_n**3 / (gemm_ms * 1e-3) / 1e12, "copy_mib": copy_mib, "gemm_n": gemm_n}
    log.info("ceilings: copy %.0f GB/s, read %.0f GB/s, bf16 GEMM %.0f TFLOP/s",
             out["copy_gbs"], out["read_gbs"], out["gemm_tflops"])
    return out


@torch.no_grad()
def time_graphs(fn: Callable[[Any], Any], inputs: Sequence[Any], device: torch.device, replays: int = 200,
                warmup: int = 20, use_graphs: bool = True) -> dict[str, float]:
    """Latency of ``fn(inputs[i])`` as CUDA-graph replays, rotating over ``inputs``.

    One graph is captured per input set; replays go round-robin so consecutive replays read
    different inputs. Each replay is timed alone with a pair of CUDA events.

    Args:
        fn: the step to time; called eagerly twice per input before capture (compiles, tunes).
        inputs: at least one input object passed as the single argument.
        device: where it runs; non-CUDA devices use host timers on eager calls.
        replays: timed replays (the median is reported).
        warmup: untimed replays after capture.
        use_graphs: capture CUDA graphs (False times eager launches).

    Returns:
        ``median_ms``, ``p10_ms``, ``p90_ms``, ``min_ms``, ``replays``, ``graphs`` (bool).
    """
    if not inputs:
        raise ValueError("time_graphs needs at least one input set")
    for inp in inputs:
        fn(inp)
        fn(inp)
    _sync(device)
    steps: list[Callable[[], Any]]
    graphs = use_graphs and device.type == "cuda"
    if graphs:
        try:
            steps = [g.replay for g in _capture(fn, inputs, device)]
        except Exception as exc:  # time eager launches rather than lose the measurement
            log.warning("CUDA-graph capture failed (%s: %s); timing eager launches", type(exc).__name__, exc)
            graphs = False
    if not graphs:
        steps = [lambda inp=inp: fn(inp) for inp in inputs]
    counter = {"i": 0}

    def step() -> None:
        steps[counter["i"] % len(steps)]()
        counter["i"] += 1

    for _ in range(warmup):
        step()
    _sync(device)
    times = sorted(_event_times_ms(step, replays, device))
    return {
        "median_ms": statistics.median(times),
        "p10_ms": times[int(0.1 * (len(times) - 1))],
        "p90_ms": times[int(0.9 * (len(times) - 1))],
        "min_ms": times[0],
        "replays": replays,
        "graphs": graphs,
    }


def _capture(fn: Callable[[Any], Any], inputs: Sequence[Any], device: torch.device) -> list:
    """One CUDA graph of ``fn(inp)`` per input, sharing a memory pool (replayed in capture order)."""
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):  # side-stream warm-up, as torch.cuda.graphs recommends
        for inp in inputs:
            fn(inp)
    torch.cuda.current_stream(device).wait_stream(stream)
    pool = torch.cuda.graph_pool_handle()
    captured = []
    for inp in inputs:
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g, pool=pool):
            fn(inp)
        captured.append(g)
    return captured


def machine_info(device: torch.device) -> dict[str, Any]:
    """GPU name, driver, memory, SM count, and torch / triton / CUDA / Python versions."""
    info: dict[str, Any] = {
        "host": platform.node(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda_runtime": torch.version.cuda,
        "device": str(device),
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except Exception as exc:
        info["triton"] = f"unavailable ({type(exc).__name__}: {exc})"
    info["triton_interpret"] = os.environ.get("TRITON_INTERPRET") == "1"
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(gpu=props.name, sm_count=props.multi_processor_count,
                    gpu_mem_gib=round(props.total_memory / 2**30, 1),
                    compute_capability=f"{props.major}.{props.minor}",
                    l2_mib=round(getattr(props, "L2_cache_size", 0) / 2**20, 1))
        try:
            out = subprocess.run(
                ["nvidia-smi", "--query-gpu=driver_version,clocks.sm,clocks.max.sm,clocks.mem,power.limit",
                 "--format=csv,noheader"], capture_output=True, text=True, timeout=20, check=False)
            info["nvidia_smi"] = out.stdout.strip() or out.stderr.strip()
        except Exception as exc:
            info["nvidia_smi"] = f"unavailable ({exc})"
    else:
        info["gpu"] = None
    return info
