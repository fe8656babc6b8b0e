"""A verified, low-latency ONNX Runtime session over an artifact directory.

:class:`PolicySession` refuses to run a model that does not match its manifest: the file's
SHA-256 must equal ``model_sha256`` and the graph's input/output names, shapes and dtypes must
equal the manifest's. It configures ORT for batch-1 control loops (sequential execution, a fixed
intra-op thread count) and records which execution provider actually took the graph.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from daptq_ros.runtime.manifest import MODEL_NAME, Manifest, ManifestError, read_manifest, sha256_file
from daptq_ros.runtime.providers import (
    CPU,
    DEFAULT_PREFERRED,
    ProviderOptions,
    select_providers,
)

logger = logging.getLogger(__name__)

# ORT type strings -> numpy dtype names used in manifests.
ORT_DTYPES: dict[str, str] = {
    "tensor(float)": "float32",
    "tensor(float16)": "float16",
    "tensor(int64)": "int64",
    "tensor(int32)": "int32",
    "tensor(uint8)": "uint8",
    "tensor(bool)": "bool",
}

# ORT's S8->U8 QDQ rewrite breaks opset-21 int8 QuantizeLinear on CPU (onnxruntime#25526) and,
# where it loads, saturates U8S8 on AVX2 without VNNI (deploy-notes A, "ORT-CPU problems").
QDQ_DISABLED_OPTIMIZERS: tuple[str, ...] = ("QDQS8ToU8Transformer",)


# CPU-flavour kernels that run U8S8 GEMMs (uint8 activations x int8 weights) on x86.
U8S8_KERNELS: frozenset[str] = frozenset({"int8", "conv_im2col", "dynamic"})
VNNI_FLAGS: tuple[str, ...] = ("avx512_vnni", "avx_vnni", "amx_int8")


def cpu_flags() -> set[str] | None:
    """x86 feature flags of this machine from /proc/cpuinfo (None where unreadable)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        return None
    return set()


def u8s8_saturation_layers(manifest: Manifest, flags: set[str] | None = None) -> list[str]:
    """CPU-flavour layers whose U8S8 GEMM may saturate on this CPU (x86 AVX2 without VNNI).

    MLAS' AVX2 U8S8 kernel adds pairs of u8*s8 products in int16 (``vpmaddubsw``): with 8-bit
    weights a pair can exceed 32767 and saturate (deploy-notes A, "ORT-CPU problems" (b)). VNNI
    (and AMX, Arm dot products) accumulate in int32 and are exact; <=4-bit weights cannot overflow.
    Re-export with ``--cpu-u8-weights`` (U8U8, exact everywhere) for such machines.
    """
    if manifest.flavour != "cpu":
        return []
    flags = cpu_flags() if flags is None else flags
    if not flags or "avx2" not in flags or any(f in flags for f in VNNI_FLAGS):
        return []
    options = manifest.config.get("cpu_options") if isinstance(manifest.config, dict) else None
    if isinstance(options, dict) and options.get("u8_weights"):
        return []
    return [
        name
        for name, layer in manifest.layers.items()
        if layer.get("kernel") in U8S8_KERNELS and int(layer.get("w_bits", 16)) > 4
    ]


class ArtifactError(RuntimeError):
    """An artifact directory is incomplete, corrupt or does not match its manifest."""


def verify_model_file(artifact_dir: Path, manifest: Manifest) -> Path:
    """Check that ``model.onnx`` exists and its SHA-256 matches the manifest; returns its path."""
    model_path = artifact_dir / MODEL_NAME
    if not model_path.is_file():
        raise ArtifactError(f"{artifact_dir}: {MODEL_NAME} is missing")
    digest = sha256_file(model_path)
    if digest != manifest.model_sha256:
        raise ArtifactError(
            f"{model_path}: checksum mismatch (sha256 {digest[:16]}..., manifest says "
            f"{manifest.model_sha256[:16]}...); the file is corrupt or was replaced after export"
        )
    return model_path


def _compare_specs(kind: str, graph: Sequence[Any], expected: Sequence[Any], model_path: Path) -> None:
    graph_names = [g.name for g in graph]
    expected_names = [e.name for e in expected]
    if graph_names != expected_names:
        raise ArtifactError(
            f"{model_path}: graph {kind} {graph_names} do not match the manifest's {expected_names}"
        )
    for g, e in zip(graph, expected, strict=True):
        dtype = ORT_DTYPES.get(g.type, g.type)
        if dtype != e.dtype:
            raise ArtifactError(
                f"{model_path}: {kind[:-1]} {g.name!r} has dtype {dtype}, manifest says {e.dtype}"
            )
        shape = list(g.shape)
        mismatch = len(shape) != len(e.shape) or any(
            isinstance(d, int) and d != m for d, m in zip(shape, e.shape, strict=True)
        )
        if mismatch:
            raise ArtifactError(
                f"{model_path}: {kind[:-1]} {g.name!r} has shape {shape}, manifest says {list(e.shape)}"
            )


class PolicySession:
    """ONNX Runtime session for one artifact directory.

    Args:
        artifact_dir: directory with ``model.onnx`` and ``manifest.json``.
        providers: allowed execution providers (full ORT names or aliases); default TensorRT >
            CUDA > CPU, whichever is installed.
        threads: intra-op threads (None: ORT's default, all cores).
        provider_options: GPU provider options (TensorRT engine cache etc.).
        available: override of the installed providers (tests).

    Attributes:
        manifest: the validated manifest.
        provider: the provider that actually runs the graph (after ORT's own fallback).
        report: the selection report (what was considered and why others were skipped).

    Raises:
        ManifestError: manifest.json missing or invalid.
        ArtifactError: model missing, checksum mismatch, graph I/O differs from the manifest, or
            ORT cannot load the model.
    """

    def __init__(
        self,
        artifact_dir: str | Path,
        providers: Sequence[str] | None = None,
        threads: int | None = None,
        provider_options: ProviderOptions | None = None,
        available: Sequence[str] | None = None,
    ) -> None:
        import onnxruntime as ort

        self.artifact_dir = Path(artifact_dir)
        if not self.artifact_dir.is_dir():
            raise ArtifactError(f"artifact directory not found: {self.artifact_dir}")
        self.manifest = read_manifest(self.artifact_dir)
        self.model_path = verify_model_file(self.artifact_dir, self.manifest)
        if threads is not None and threads < 1:
            raise ValueError(f"threads must be >= 1 (or None for ORT's default), got {threads}")
        has_qdq = self.manifest.flavour != "fp32"
        if provider_options is None:
            a_bits = [int(layer.get("a_bits", 16)) for layer in self.manifest.layers.values()]
            provider_options = ProviderOptions(trt_int8=has_qdq and any(b <= 8 for b in a_bits))
        provider_list, self.report = select_providers(
            providers or DEFAULT_PREFERRED, available=available, options=provider_options
        )
        opts = ort.SessionOptions()
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.inter_op_num_threads = 1
        if threads is not None:
            opts.intra_op_num_threads = int(threads)
        opts.log_severity_level = 3  # ORT warnings about unused initializers are noise here
        kwargs: dict[str, Any] = {}
        if has_qdq:
            kwargs["disabled_optimizers"] = list(QDQ_DISABLED_OPTIMIZERS)
        try:
            self._session = ort.InferenceSession(
                str(self.model_path), sess_options=opts, providers=provider_list, **kwargs
            )
        except Exception as err:  # ORT raises Fail/InvalidGraph/... (pybind types)
            raise ArtifactError(f"{self.model_path}: onnxruntime cannot load the model: {err}") from err
        _compare_specs("inputs", self._session.get_inputs(), self.manifest.inputs, self.model_path)
        _compare_specs("outputs", self._session.get_outputs(), self.manifest.outputs, self.model_path)
        active = self._session.get_providers()
        self.provider: str = active[0] if active else CPU
        if self.provider == CPU:
            risky = u8s8_saturation_layers(self.manifest)
            if risky:
                logger.warning(
                    "%s: %d layer(s) with 8-bit weights run U8S8 int8 GEMMs, which can saturate on this "
                    "x86 CPU without VNNI (e.g. %s); re-export with `daptq export ... --flavour cpu "
                    "--cpu-u8-weights` for exact U8U8 kernels",
                    self.model_path,
                    len(risky),
                    risky[0],
                )
        if self.provider != self.report.primary:
            logger.warning(
                "requested %s but onnxruntime fell back to %s (provider init failed; see ORT log)",
                self.report.primary,
                self.provider,
            )
        self.threads = threads
        self.output_names = [o.name for o in self.manifest.outputs]
        self._expected = {spec.name: spec for spec in self.manifest.inputs}
        self.last_latency_s = float("nan")
        logger.info(
            "loaded %s (method=%s, flavour=%s) on %s",
            self.model_path,
            self.manifest.method,
            self.manifest.flavour,
            self.provider,
        )

    @property
    def input_names(self) -> list[str]:
        return [spec.name for spec in self.manifest.inputs]

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run the graph once; ``feeds`` must hold exactly the manifest's inputs.

        Arrays are cast to the manifest dtype and made contiguous; a wrong name or shape raises
        ``ValueError`` naming the input.
        """
        missing = [n for n in self._expected if n not in feeds]
        extra = [n for n in feeds if n not in self._expected]
        if missing or extra:
            raise ValueError(f"feeds: missing inputs {missing}, unexpected inputs {extra}")
        prepared = {}
        for name, spec in self._expected.items():
            arr = np.ascontiguousarray(feeds[name], dtype=np.dtype(spec.dtype))
            if arr.shape != tuple(spec.shape):
                raise ValueError(
                    f"input {name!r} has shape {arr.shape}, the model expects {tuple(spec.shape)}"
                )
            prepared[name] = arr
        start = time.perf_counter()
        outputs = self._session.run(self.output_names, prepared)
        self.last_latency_s = time.perf_counter() - start
        return dict(zip(self.output_names, outputs, strict=True))


__all__ = ["ArtifactError", "ManifestError", "PolicySession", "verify_model_file"]
