"""Export a PyTorch policy (Model I/O contract) to an artifact directory: model.onnx + manifest.

Uses the torch.export-based exporter (``dynamo=True``, opset 21: needed later for INT4 and
blocked DequantizeLinear) and falls back to the TorchScript exporter when it fails. Batch 1 is
static (the dynamo exporter silently specializes ``Dim("batch", min=1)`` to 1 anyway). Every
export is validated with ``onnx.checker`` (full check) and against eager torch through ORT.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from daptq_ros import __version__
from daptq_ros.policy_api import ACTION_NAMES
from daptq_ros.runtime.instructions import InstructionTable
from daptq_ros.runtime.manifest import (
    INSTRUCTIONS_NAME,
    MODEL_NAME,
    NORM_KEYS,
    ImageSpec,
    Manifest,
    TensorSpec,
    sha256_file,
    write_manifest,
)

logger = logging.getLogger(__name__)

DEFAULT_OPSET = 21
OUTPUT_NAME = "actions"
ONNX_TO_NUMPY: dict[int, str] = {
    onnx.TensorProto.FLOAT: "float32",
    onnx.TensorProto.FLOAT16: "float16",
    onnx.TensorProto.INT64: "int64",
    onnx.TensorProto.INT32: "int32",
    onnx.TensorProto.UINT8: "uint8",
    onnx.TensorProto.BOOL: "bool",
}


class ExportError(RuntimeError):
    """Export failed or produced a graph that does not match the torch model."""


InstructionsSource = str | Path | InstructionTable | Mapping[str, tuple[np.ndarray, np.ndarray]]


def torch_to_onnx(
    model: Any,
    example_inputs: Mapping[str, Any],
    path: str | Path,
    opset: int = DEFAULT_OPSET,
    prefer_dynamo: bool = True,
) -> str:
    """Write ``model`` as ONNX to ``path``; returns the exporter used (``dynamo`` or ``legacy``).

    Args:
        model: a ``torch.nn.Module`` whose forward takes the ``example_inputs`` keys as arguments.
        example_inputs: input name -> batch-1 tensor, in forward-signature order.
        path: output ``.onnx`` file.
        opset: ONNX opset (the legacy exporter is capped at 20 and used only as fallback).
        prefer_dynamo: try the torch.export-based exporter first.
    """
    import torch

    names = list(example_inputs)
    model = model.eval()
    errors = []
    if prefer_dynamo:
        try:
            with torch.no_grad():
                torch.onnx.export(
                    model,
                    (),
                    str(path),
                    kwargs=dict(example_inputs),
                    dynamo=True,
                    opset_version=opset,
                    input_names=names,
                    output_names=[OUTPUT_NAME],
                    external_data=False,
                    optimize=True,
                    verbose=False,
                )
            return "dynamo"
        except Exception as err:  # torch.export raises many types (Unsupported, UserError, ...)
            errors.append(f"dynamo: {type(err).__name__}: {err}")
            logger.warning(
                "dynamo ONNX export failed (%s: %s); falling back to the legacy exporter",
                type(err).__name__,
                str(err).splitlines()[0] if str(err) else "",
            )
    legacy_opset = min(opset, 20)
    try:
        with torch.no_grad():
            torch.onnx.export(
                model,
                tuple(example_inputs.values()),
                str(path),
                dynamo=False,
                opset_version=legacy_opset,
                input_names=names,
                output_names=[OUTPUT_NAME],
                do_constant_folding=True,
            )
    except Exception as err:
        errors.append(f"legacy: {type(err).__name__}: {err}")
        raise ExportError("ONNX export failed with every exporter:\n" + "\n".join(errors)) from err
    logger.info("exported with the legacy TorchScript exporter (opset %d)", legacy_opset)
    return "legacy"


def graph_specs(model: onnx.ModelProto) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """Static input/output specs of a graph; dynamic dims raise :class:`ExportError`."""

    def spec(value: onnx.ValueInfoProto) -> TensorSpec:
        ttype = value.type.tensor_type
        dims = []
        for d in ttype.shape.dim:
            if not d.HasField("dim_value"):
                raise ExportError(f"graph tensor {value.name!r} has a dynamic dimension {d.dim_param!r}")
            dims.append(int(d.dim_value))
        dtype = ONNX_TO_NUMPY.get(ttype.elem_type)
        if dtype is None:
            raise ExportError(f"graph tensor {value.name!r} has unsupported element type {ttype.elem_type}")
        return TensorSpec(value.name, tuple(dims), dtype)

    inits = {i.name for i in model.graph.initializer}
    inputs = [spec(v) for v in model.graph.input if v.name not in inits]
    return inputs, [spec(v) for v in model.graph.output]


def check_model(model: onnx.ModelProto | str | Path) -> None:
    """``onnx.checker.check_model(full_check=True)``, re-raised as :class:`ExportError`."""
    try:
        onnx.checker.check_model(model if not isinstance(model, Path) else str(model), full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as err:
        raise ExportError(f"onnx.checker rejected the graph: {err}") from err


def run_onnx(
    model_path: str | Path,
    feeds: Mapping[str, np.ndarray],
    disable_optimizations: bool = False,
    disabled_optimizers: Sequence[str] = (),
) -> np.ndarray:
    """Run a graph once on ORT-CPU (one thread) and return its first output."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.log_severity_level = 3
    if disable_optimizations:
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(
        str(model_path),
        opts,
        providers=["CPUExecutionProvider"],
        disabled_optimizers=list(disabled_optimizers),
    )
    return sess.run(None, dict(feeds))[0]


def write_instructions(source: InstructionsSource, out_path: Path) -> InstructionTable:
    """Copy (validated) or write ``instructions.safetensors`` into the artifact."""
    if isinstance(source, (str, Path)):
        table = InstructionTable.load(source)  # validates the layout before shipping it
        shutil.copyfile(source, out_path)
        return table
    table = source if isinstance(source, InstructionTable) else InstructionTable(source)
    table.save(out_path)
    return table


def _numpy_inputs(example_inputs: Mapping[str, Any]) -> dict[str, np.ndarray]:
    return {k: v.detach().cpu().numpy().astype(np.float32) for k, v in example_inputs.items()}


def _check_norm(norm: Mapping[str, Sequence[float]], action_dim: int) -> dict[str, list[float]]:
    missing = [k for k in NORM_KEYS if k not in norm]
    if missing:
        raise ExportError(f"norm is missing {missing} (expected {list(NORM_KEYS)})")
    out = {k: [float(v) for v in np.asarray(norm[k], dtype=np.float64).reshape(-1)] for k in NORM_KEYS}
    if len(out["action_mean"]) != action_dim:
        raise ExportError(
            f"norm action_mean has {len(out['action_mean'])} values, the model outputs {action_dim}"
        )
    return out


def export_policy(
    model: Any,
    example_inputs: Mapping[str, Any],
    out_dir: str | Path,
    *,
    norm: Mapping[str, Sequence[float]],
    instructions_cache: InstructionsSource,
    config_meta: Mapping[str, Any] | None = None,
    method: str = "fp32",
    opset: int = DEFAULT_OPSET,
    action_names: Sequence[str] | None = None,
    prefer_dynamo: bool = True,
    atol: float = 1e-4,
) -> Manifest:
    """Export a float policy to ``out_dir`` (model.onnx, manifest.json, instructions.safetensors).

    Args:
        model: torch module with the contract's I/O (image, lang_tokens, lang_mask, proprio[, noise]
            -> actions (B, H, A)).
        example_inputs: name -> batch-1 tensor (e.g. ``ReferenceVLA.example_inputs(1)``).
        out_dir: artifact directory (created; existing artifact files are overwritten).
        norm: ``proprio_mean/std``, ``action_mean/std`` (written to the manifest, not the graph).
        instructions_cache: path of an InstructionCache safetensors file, an
            :class:`InstructionTable`, or a mapping instruction -> (tokens, mask).
        config_meta: model config and provenance stored under the manifest's ``config``.
        method: method name recorded in the manifest.
        opset: ONNX opset (21 recommended: INT4 and blocked DQ need it).
        action_names: names of the action dimensions (default: Meta-World's dx, dy, dz, gripper).
        prefer_dynamo: try the dynamo exporter first.
        atol: max |ORT - torch| allowed on the example inputs.

    Returns:
        The written :class:`Manifest`.

    Raises:
        ExportError: export failed, the checker rejected the graph, or ORT disagrees with torch.
    """
    import torch

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    batch = {k: int(v.shape[0]) for k, v in example_inputs.items()}
    if set(batch.values()) != {1}:
        raise ExportError(f"example_inputs must have batch size 1 (static batch-1 graph), got {batch}")
    with torch.no_grad():
        reference = model.eval()(**example_inputs).detach().cpu().numpy()
    if reference.ndim != 3:
        raise ExportError(f"model output must be actions (B, H, A), got shape {reference.shape}")
    chunk_size, action_dim = int(reference.shape[1]), int(reference.shape[2])
    names = list(action_names) if action_names is not None else list(ACTION_NAMES[:action_dim])
    if len(names) != action_dim:
        raise ExportError(f"action_names has {len(names)} entries, the model outputs {action_dim} dims")
    norm_lists = _check_norm(norm, action_dim)

    with tempfile.TemporaryDirectory(dir=out_dir) as tmp:
        tmp_path = Path(tmp) / MODEL_NAME
        exporter = torch_to_onnx(model, example_inputs, tmp_path, opset=opset, prefer_dynamo=prefer_dynamo)
        proto = onnx.load(str(tmp_path))
        actual_opset = next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))
        set_model_metadata(
            proto, {"daptq.method": method, "daptq.flavour": "fp32", "daptq.package_version": __version__}
        )
        strip_debug_metadata(proto)
        check_model(proto)
        onnx.save(proto, str(out_dir / MODEL_NAME))
    inputs, outputs = graph_specs(proto)
    feeds = _numpy_inputs(example_inputs)
    feeds = {spec.name: feeds[spec.name] for spec in inputs}
    got = run_onnx(out_dir / MODEL_NAME, feeds)
    err = float(np.max(np.abs(got - reference)))
    logger.info("export parity on the example inputs: max |ORT - torch| = %.3g", err)
    if not err <= atol:
        raise ExportError(f"ONNX output differs from torch by {err:.3g} (> atol {atol}); export is wrong")
    table = write_instructions(instructions_cache, out_dir / INSTRUCTIONS_NAME)
    image = next((s for s in inputs if s.name == "image"), None)
    config = dict(config_meta or {})
    config["export_check"] = {"max_abs_err_vs_torch": err, "exporter": exporter}
    manifest = Manifest(
        model_sha256=sha256_file(out_dir / MODEL_NAME),
        inputs=inputs,
        outputs=outputs,
        normalization=norm_lists,
        chunk_size=chunk_size,
        action_names=names,
        image=ImageSpec(size=(image.shape[2], image.shape[3])) if image else ImageSpec(),
        method=method,
        avg_bits=32.0,
        flavour="fp32",
        opset=int(actual_opset),
        exporter=exporter,
        config=json.loads(json.dumps(config, default=str)),
    )
    write_manifest(manifest, out_dir)
    logger.info(
        "wrote artifact %s (%d instructions, %s exporter, opset %d)",
        out_dir,
        len(table),
        exporter,
        manifest.opset,
    )
    return manifest


# Node metadata the dynamo exporter writes for debugging (stack traces, FX nodes, class paths):
# ~1 KB per node, about 1 MB for the reference VLA, i.e. a third of a 4-bit weight file. Only the
# module scopes are kept (the QDQ rewrite maps nodes to layers with them).
KEEP_NODE_METADATA = ("pkg.torch.onnx.name_scopes",)


def strip_debug_metadata(model: onnx.ModelProto, keep: Sequence[str] = KEEP_NODE_METADATA) -> int:
    """Drop node ``metadata_props`` other than ``keep``, node doc strings and intermediate
    ``value_info`` (ORT re-infers shapes); returns the bytes saved."""
    before = model.ByteSize()
    del model.graph.value_info[:]
    for node in model.graph.node:
        kept = [p for p in node.metadata_props if p.key in keep]
        del node.metadata_props[:]
        node.metadata_props.extend(kept)
        node.doc_string = ""
    return before - model.ByteSize()


def fp16_export_bytes(model: onnx.ModelProto) -> int:
    """Serialized size of ``model`` with every float32 initializer stored as float16.

    The weight file an FP16 export of the same graph would have (the reference for the "4-bit
    file <= 30 % of FP16" target); the graph itself is not converted or run.
    """
    total = model.ByteSize()
    for init in model.graph.initializer:
        if init.data_type == onnx.TensorProto.FLOAT:
            half = onnx.numpy_helper.from_array(
                onnx.numpy_helper.to_array(init).astype(np.float16), init.name
            )
            total += half.ByteSize() - init.ByteSize()
    return total


def set_model_metadata(model: onnx.ModelProto, entries: Mapping[str, str]) -> None:
    """Set (replace) ``metadata_props`` entries on a model."""
    keep = [p for p in model.metadata_props if p.key not in entries]
    del model.metadata_props[:]
    model.metadata_props.extend(keep)
    for key, value in entries.items():
        model.metadata_props.add(key=key, value=str(value))
