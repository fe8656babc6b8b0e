"""``manifest.json``: what an artifact directory holds and how to feed it.

Written by ``daptq_ros.export`` next to ``model.onnx`` and ``instructions.safetensors``; read by
the runtime, the ROS node and the drift tools, which need nothing else. Reading validates every
key (missing, unknown, wrong type, unsupported ``format_version``) with an error naming it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
MODEL_NAME = "model.onnx"
INSTRUCTIONS_NAME = "instructions.safetensors"
FLAVOURS: tuple[str, ...] = ("fp32", "trt", "cpu")
NORM_KEYS: tuple[str, ...] = ("proprio_mean", "proprio_std", "action_mean", "action_std")
DTYPES: tuple[str, ...] = ("float32", "float16", "int64", "int32", "uint8", "bool")


class ManifestError(ValueError):
    """manifest.json is missing, malformed or inconsistent; the message names the key."""


@dataclass(frozen=True)
class TensorSpec:
    """One graph input or output: name, static shape, numpy dtype name."""

    name: str
    shape: tuple[int, ...]
    dtype: str = "float32"

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype}


@dataclass(frozen=True)
class ImageSpec:
    """Camera input the graph expects: (height, width), source encoding, value range."""

    size: tuple[int, int] = (128, 128)
    encoding: str = "rgb8"
    range: tuple[float, float] = (0.0, 1.0)

    def to_json(self) -> dict[str, Any]:
        return {"size": list(self.size), "encoding": self.encoding, "range": list(self.range)}


@dataclass
class Manifest:
    """Description of one exported policy artifact (see docs/architecture.md, "Artifact directory").

    Attributes:
        model_sha256: hex SHA-256 of ``model.onnx``.
        inputs: graph inputs in order (contract: image, lang_tokens, lang_mask, proprio[, noise]).
        outputs: graph outputs (contract: actions (1, H, A)).
        normalization: ``proprio_mean/std``, ``action_mean/std`` lists (never baked into the graph).
        chunk_size: H, actions per predicted chunk.
        action_names: names of the A action dimensions.
        image: camera input spec.
        method: quantization method name (``fp32`` for the float export).
        budget: average-bit budget the quantizer was given (None for fp32).
        avg_bits: parameter-weighted average weight bits of the exported graph.
        layers: per-layer ``{"w_bits", "a_bits", "group_size", ...}`` of quantized layers.
        flavour: ``fp32`` (no QDQ), ``trt`` (S8S8 QDQ, TensorRT rules) or ``cpu`` (ORT-CPU friendly).
        opset: ONNX opset of ``model.onnx``.
        exporter: ``dynamo`` or ``legacy`` torch.onnx exporter.
        config: model config and provenance (free-form, from the checkpoint).
        package_version: daptq_ros version that wrote the artifact.
        format_version: manifest schema version.
    """

    model_sha256: str
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    normalization: dict[str, list[float]]
    chunk_size: int
    action_names: list[str]
    image: ImageSpec = field(default_factory=ImageSpec)
    method: str = "fp32"
    budget: float | None = None
    avg_bits: float = 32.0
    layers: dict[str, dict[str, Any]] = field(default_factory=dict)
    flavour: str = "fp32"
    opset: int = 21
    exporter: str = "dynamo"
    config: dict[str, Any] = field(default_factory=dict)
    package_version: str = ""
    format_version: int = FORMAT_VERSION

    def __post_init__(self) -> None:
        if not self.package_version:
            from daptq_ros import __version__

            self.package_version = __version__
        self.validate()

    def input(self, name: str) -> TensorSpec | None:
        """The input spec called ``name``, or None."""
        return next((spec for spec in self.inputs if spec.name == name), None)

    @property
    def action_dim(self) -> int:
        return len(self.action_names)

    def validate(self) -> None:
        """Check internal consistency; raises :class:`ManifestError` naming the bad key."""
        if self.format_version != FORMAT_VERSION:
            raise ManifestError(
                f"format_version {self.format_version} is not supported (this package reads {FORMAT_VERSION})"
            )
        if len(self.model_sha256) != 64 or any(c not in "0123456789abcdef" for c in self.model_sha256):
            raise ManifestError(f"model_sha256 must be 64 lowercase hex digits, got {self.model_sha256!r}")
        if self.flavour not in FLAVOURS:
            raise ManifestError(f"flavour {self.flavour!r} is not one of {list(FLAVOURS)}")
        if not self.inputs or not self.outputs:
            raise ManifestError("inputs and outputs must each list at least one tensor")
        for key, specs in (("inputs", self.inputs), ("outputs", self.outputs)):
            names = [s.name for s in specs]
            if len(set(names)) != len(names):
                raise ManifestError(f"{key}: duplicate tensor names {names}")
            for spec in specs:
                if spec.dtype not in DTYPES:
                    raise ManifestError(
                        f"{key}.{spec.name}.dtype {spec.dtype!r} is not one of {list(DTYPES)}"
                    )
                if any((not isinstance(d, int)) or d <= 0 for d in spec.shape):
                    raise ManifestError(f"{key}.{spec.name}.shape {spec.shape} must be positive integers")
        missing = [k for k in NORM_KEYS if k not in self.normalization]
        if missing:
            raise ManifestError(f"normalization is missing {missing}")
        unknown = sorted(set(self.normalization) - set(NORM_KEYS))
        if unknown:
            raise ManifestError(f"normalization has unknown keys {unknown}")
        for k in ("action_mean", "action_std"):
            if len(self.normalization[k]) != len(self.action_names):
                raise ManifestError(
                    f"normalization.{k} has {len(self.normalization[k])} values but action_names has "
                    f"{len(self.action_names)}"
                )
        for k in ("proprio_std", "action_std"):
            if any((not math.isfinite(v)) or v <= 0 for v in self.normalization[k]):
                raise ManifestError(f"normalization.{k} must be finite and > 0, got {self.normalization[k]}")
        if len(self.normalization["proprio_mean"]) != len(self.normalization["proprio_std"]):
            raise ManifestError("normalization.proprio_mean and proprio_std differ in length")
        if self.chunk_size < 1:
            raise ManifestError(f"chunk_size must be >= 1, got {self.chunk_size}")
        if len(self.image.size) != 2 or min(self.image.size) <= 0:
            raise ManifestError(f"image.size must be [height, width] > 0, got {list(self.image.size)}")

    def to_json(self) -> dict[str, Any]:
        """A JSON-serialisable dict with the manifest's keys."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name in ("inputs", "outputs"):
                value = [spec.to_json() for spec in value]
            elif f.name == "image":
                value = value.to_json()
            out[f.name] = value
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any], source: str = "manifest") -> Manifest:
        """Build from a parsed dict; unknown or missing keys raise :class:`ManifestError`."""
        if not isinstance(data, dict):
            raise ManifestError(f"{source}: expected a JSON object, got {type(data).__name__}")
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - set(fields))
        if unknown:
            raise ManifestError(f"{source}: unknown key(s) {unknown}; valid keys: {sorted(fields)}")
        required = [
            name
            for name, f in fields.items()
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        ]
        required += ["format_version", "package_version", "method", "flavour", "image"]
        missing = sorted(set(required) - set(data))
        if missing:
            raise ManifestError(f"{source}: missing key(s) {missing}")
        if data["format_version"] != FORMAT_VERSION:
            raise ManifestError(
                f"{source}: format_version {data['format_version']!r} is not supported "
                f"(this package reads {FORMAT_VERSION}); re-export the artifact"
            )
        kwargs = dict(data)
        try:
            kwargs["inputs"] = [_spec(s, f"inputs[{i}]") for i, s in enumerate(data["inputs"])]
            kwargs["outputs"] = [_spec(s, f"outputs[{i}]") for i, s in enumerate(data["outputs"])]
            img = data["image"]
            kwargs["image"] = ImageSpec(
                size=tuple(int(v) for v in img["size"]),
                encoding=str(img["encoding"]),
                range=tuple(float(v) for v in img["range"]),
            )
            kwargs["normalization"] = {
                k: [float(v) for v in vals] for k, vals in dict(data["normalization"]).items()
            }
            kwargs["action_names"] = [str(v) for v in data["action_names"]]
            kwargs["chunk_size"] = int(data["chunk_size"])
        except (KeyError, TypeError, ValueError) as err:
            raise ManifestError(f"{source}: malformed value: {err!r}") from err
        try:
            return cls(**kwargs)
        except ManifestError as err:
            raise ManifestError(f"{source}: {err}") from err


def _spec(data: Any, where: str) -> TensorSpec:
    if not isinstance(data, dict) or set(data) != {"name", "shape", "dtype"}:
        raise ManifestError(f"{where} must be an object with exactly name, shape, dtype; got {data!r}")
    return TensorSpec(
        name=str(data["name"]), shape=tuple(int(d) for d in data["shape"]), dtype=str(data["dtype"])
    )


def sha256_file(path: str | Path, chunk_bytes: int = 1 << 20) -> str:
    """Hex SHA-256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()


def write_manifest(manifest: Manifest, artifact_dir: str | Path) -> Path:
    """Write ``artifact_dir/manifest.json`` (validated first); returns its path."""
    manifest.validate()
    path = Path(artifact_dir) / MANIFEST_NAME
    path.write_text(json.dumps(manifest.to_json(), indent=2, sort_keys=False) + "\n")
    logger.debug("wrote %s", path)
    return path


def read_manifest(path: str | Path) -> Manifest:
    """Read and validate a manifest from an artifact directory or a ``manifest.json`` path.

    Raises:
        ManifestError: the file is missing, not JSON, or fails validation.
    """
    path = Path(path)
    if path.is_dir():
        path = path / MANIFEST_NAME
    if not path.is_file():
        raise ManifestError(f"manifest not found: {path}")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ManifestError(f"{path}: not valid JSON: {err}") from err
    return Manifest.from_json(data, source=str(path))
