"""ONNX Runtime execution-provider selection: TensorRT, then CUDA, then CPU, whichever is present.

:func:`select_providers` turns a preference list (from the node's params or the CLI) into the
``providers`` argument of ``onnxruntime.InferenceSession`` — ``[(name, options), ...]`` in
priority order, so ORT falls back node by node — plus a :class:`ProviderReport` saying which one
leads and why every other known provider was not taken. Pass ``available=`` to test the logic
on a machine without a GPU.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

TENSORRT = "TensorrtExecutionProvider"
CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"
KNOWN_PROVIDERS: tuple[str, ...] = (TENSORRT, CUDA, CPU)
DEFAULT_PREFERRED: tuple[str, ...] = KNOWN_PROVIDERS

# Short names accepted from YAML params (`preferred_provider: tensorrt`).
ALIASES: dict[str, str] = {"tensorrt": TENSORRT, "trt": TENSORRT, "cuda": CUDA, "cpu": CPU}


@dataclass(frozen=True)
class ProviderOptions:
    """Options for the GPU providers (ignored by the CPU provider).

    Args:
        device_id: CUDA device index.
        trt_fp16: let TensorRT pick fp16 kernels for float layers.
        trt_int8: enable INT8 (TRT 8.x needs it for QDQ graphs; TRT 10 reads the QDQ nodes).
        trt_engine_cache: cache built engines so the node does not rebuild on every start.
        trt_engine_cache_path: directory for cached engines (created when needed).
        trt_timing_cache: cache kernel timings next to the engines.
        trt_max_workspace_size: TensorRT builder workspace in bytes.
        cuda_mem_limit: CUDA EP arena limit in bytes (0 = no limit).
    """

    device_id: int = 0
    trt_fp16: bool = True
    trt_int8: bool = False
    trt_engine_cache: bool = True
    trt_engine_cache_path: str = "~/.cache/daptq_ros/trt_engines"
    trt_timing_cache: bool = True
    trt_max_workspace_size: int = 2 << 30
    cuda_mem_limit: int = 0

    def __post_init__(self) -> None:
        if self.device_id < 0:
            raise ValueError(f"device_id must be >= 0, got {self.device_id}")
        if self.trt_max_workspace_size <= 0:
            raise ValueError(f"trt_max_workspace_size must be > 0, got {self.trt_max_workspace_size}")
        if self.cuda_mem_limit < 0:
            raise ValueError(f"cuda_mem_limit must be >= 0, got {self.cuda_mem_limit}")

    def for_provider(self, name: str) -> dict[str, Any]:
        """ORT provider options for ``name`` (string values, as ORT's C API expects them)."""
        if name == TENSORRT:
            opts: dict[str, Any] = {
                "device_id": str(self.device_id),
                "trt_fp16_enable": _flag(self.trt_fp16),
                "trt_int8_enable": _flag(self.trt_int8),
                "trt_max_workspace_size": str(self.trt_max_workspace_size),
                "trt_engine_cache_enable": _flag(self.trt_engine_cache),
                "trt_timing_cache_enable": _flag(self.trt_timing_cache),
            }
            if self.trt_engine_cache or self.trt_timing_cache:
                cache = str(Path(self.trt_engine_cache_path).expanduser())
                opts["trt_engine_cache_path"] = cache
                opts["trt_timing_cache_path"] = cache
            return opts
        if name == CUDA:
            opts = {"device_id": str(self.device_id), "cudnn_conv_algo_search": "HEURISTIC"}
            if self.cuda_mem_limit:
                opts["gpu_mem_limit"] = str(self.cuda_mem_limit)
            return opts
        return {}


def _flag(value: bool) -> str:
    return "True" if value else "False"


@dataclass
class ProviderReport:
    """Outcome of provider selection.

    Attributes:
        selected: provider names passed to ORT, highest priority first.
        skipped: provider name -> why it was not selected.
        available: what ``onnxruntime.get_available_providers()`` (or the caller) reported.
    """

    selected: list[str]
    skipped: dict[str, str] = field(default_factory=dict)
    available: list[str] = field(default_factory=list)

    @property
    def primary(self) -> str:
        """The provider that runs the graph unless ORT itself falls back at session creation."""
        return self.selected[0]

    def summary(self) -> str:
        """One line for logs and diagnostics."""
        skipped = "; ".join(f"{name}: {why}" for name, why in self.skipped.items())
        return f"using {self.primary} (order {' > '.join(self.selected)})" + (
            f"; not used: {skipped}" if skipped else ""
        )


def normalize_provider_name(name: str) -> str:
    """Map an alias (``tensorrt``, ``cuda``, ``cpu``) or a full ORT name to the full ORT name.

    Raises:
        ValueError: ``name`` is not a provider this package knows.
    """
    if name in KNOWN_PROVIDERS:
        return name
    alias = ALIASES.get(name.strip().lower())
    if alias is None:
        raise ValueError(
            f"unknown execution provider {name!r}; known: {', '.join(KNOWN_PROVIDERS)} "
            f"(or aliases {', '.join(ALIASES)})"
        )
    return alias


def select_providers(
    preferred: Sequence[str] = DEFAULT_PREFERRED,
    available: Sequence[str] | None = None,
    options: ProviderOptions | None = None,
) -> tuple[list[tuple[str, dict[str, Any]]], ProviderReport]:
    """Choose ORT execution providers in the order TensorRT, CUDA, CPU among those allowed.

    Args:
        preferred: allowed providers (full ORT names or aliases); order among the known ones is
            always TensorRT > CUDA > CPU. Leave CPU out to refuse running without a GPU (ORT
            still runs single nodes a GPU provider rejects on its implicit CPU fallback).
        available: providers present in this ORT build; defaults to
            ``onnxruntime.get_available_providers()``.
        options: GPU provider options (defaults: :class:`ProviderOptions`).

    Returns:
        ``(providers, report)``: ``providers`` is ``[(name, options_dict), ...]`` for
        ``onnxruntime.InferenceSession(providers=...)``.

    Raises:
        ValueError: an unknown provider name in ``preferred``, an empty ``preferred``, or none of
            the allowed providers installed.
    """
    if isinstance(preferred, str):
        preferred = [preferred]
    if not preferred:
        raise ValueError(
            "preferred providers list is empty; allow at least one of " + ", ".join(KNOWN_PROVIDERS)
        )
    wanted = {normalize_provider_name(p) for p in preferred}
    if available is None:
        import onnxruntime as ort

        available = ort.get_available_providers()
    available = list(available)
    options = options or ProviderOptions()
    selected: list[str] = []
    skipped: dict[str, str] = {}
    for name in KNOWN_PROVIDERS:
        if name not in wanted:
            skipped[name] = "excluded by config"
        elif name not in available:
            skipped[name] = "not installed in this onnxruntime build"
            if name == TENSORRT:
                skipped[name] += " (needs onnxruntime-gpu built with TensorRT)"
            elif name == CUDA:
                skipped[name] += " (needs onnxruntime-gpu and a CUDA driver)"
        else:
            selected.append(name)
    if not selected:
        raise ValueError(
            f"none of the allowed execution providers {sorted(wanted)} is available; "
            f"this onnxruntime offers {available}"
        )
    report = ProviderReport(selected=selected, skipped=skipped, available=available)
    logger.info("execution providers: %s", report.summary())
    return [(name, options.for_provider(name)) for name in selected], report
