"""`daptq export`: FP or quantized checkpoint -> artifact directory (model.onnx, manifest, instructions).

Examples::

    daptq export --checkpoint policy.safetensors --out artifacts/fp32
    daptq export --quantized policy_daptq_w4.safetensors --out artifacts/daptq_w4 --flavour trt
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
from pathlib import Path
from typing import Any

from daptq_ros.export.onnx_export import DEFAULT_OPSET, ExportError, export_policy

logger = logging.getLogger(__name__)

HELP = "export a (quantized) policy to ONNX with QDQ nodes plus manifest.json"
INSTRUCTIONS_FILE = "instructions.safetensors"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument(
        "--checkpoint", type=Path, help="FP checkpoint (.safetensors, daptq.checkpoint metadata)"
    )
    src.add_argument(
        "--quantized", type=Path, help="quantized checkpoint (.safetensors, daptq.quant metadata)"
    )
    parser.add_argument("--out", type=Path, required=True, help="artifact directory to write")
    parser.add_argument(
        "--flavour",
        choices=("trt", "cpu"),
        default="trt",
        help="flavour of a quantized export: trt = S8S8 QDQ (TensorRT rules; runs as DQ + float ops on "
        "ORT-CPU, slower than FP32), cpu = ORT-CPU integer kernels (MatMulIntegerToFloat, MatMulNBits, "
        "ConvInteger) with the same integers and scales; ignored for --checkpoint",
    )
    parser.add_argument(
        "--cpu-weight-only",
        choices=("dynamic", "float", "nbits"),
        default="dynamic",
        help="cpu flavour, per-channel layers without an activation scale: dynamic = int8 with run-time "
        "activation scales (fastest), float = exact weight-only at FP32 speed, nbits = MatMulNBits",
    )
    parser.add_argument(
        "--cpu-accuracy-level",
        type=int,
        choices=(0, 4),
        default=4,
        help="cpu flavour, MatMulNBits (grouped layers) compute: 4 = int8 (fast), 0 = float (exact)",
    )
    parser.add_argument(
        "--cpu-conv",
        choices=("im2col", "integer", "float"),
        default="im2col",
        help="cpu flavour, convs with an activation scale: im2col = int8 GEMM (U8S8) over the quantized "
        "input's patches, integer = ConvInteger (U8U8), both with the quantizer's input scale; "
        "float = dequantized weights folded at load, input kept float",
    )
    parser.add_argument(
        "--cpu-u8-weights",
        action="store_true",
        help="cpu flavour: uint8 weights (U8U8 GEMMs), exact on x86 CPUs without VNNI where U8S8 "
        "int8 GEMMs with 8-bit weights can saturate (slower on VNNI CPUs)",
    )
    parser.add_argument("--opset", type=int, default=DEFAULT_OPSET, help="ONNX opset (QDQ needs >= 21)")
    parser.add_argument(
        "--instructions",
        type=Path,
        default=None,
        help="instruction cache to ship (default: instructions.safetensors next to the "
        "checkpoint, then the package asset, else encode the checkpoint's "
        "instructions with MiniLM)",
    )
    parser.add_argument("--legacy-exporter", action="store_true", help="skip the dynamo exporter")
    parser.add_argument("--json", type=Path, default=None, help="write the manifest summary here")


def _instruction_source(args: argparse.Namespace, checkpoint: Path, instructions: list[str]) -> Any:
    if args.instructions is not None:
        if not args.instructions.is_file():
            raise ExportError(f"--instructions {args.instructions}: file not found")
        return args.instructions
    beside = checkpoint.parent / INSTRUCTIONS_FILE
    if beside.is_file():
        return beside
    asset = Path(__file__).resolve().parents[1] / "assets" / INSTRUCTIONS_FILE
    if asset.is_file():
        return asset
    if not instructions:
        raise ExportError(
            f"no instruction cache: pass --instructions, or put {INSTRUCTIONS_FILE} next to {checkpoint}"
        )
    from daptq_ros.model.language import build_cache

    logger.info("encoding %d instructions from the checkpoint metadata with MiniLM", len(instructions))
    cache = build_cache(instructions)
    return {text: cache.get(text) for text in cache.instructions}


def _export_fp(args: argparse.Namespace, checkpoint: Path, out: Path) -> Any:
    from daptq_ros.model.io import CheckpointError, load_checkpoint

    try:
        loaded = load_checkpoint(checkpoint)
    except CheckpointError as err:
        raise ExportError(str(err)) from err
    return export_policy(
        loaded.model,
        loaded.model.example_inputs(1),
        out,
        norm=loaded.norm.to_dict(),
        instructions_cache=_instruction_source(args, checkpoint, loaded.instructions),
        config_meta={
            "checkpoint": str(checkpoint),
            "model": loaded.meta.get("config", {}),
            "train": loaded.meta.get("train", {}),
        },
        opset=args.opset,
        prefer_dynamo=not args.legacy_exporter,
    )


def _export_quantized(args: argparse.Namespace) -> Any:
    from daptq_ros.export.cpu import CpuOptions
    from daptq_ros.export.qdq import export_qdq
    from daptq_ros.export.quantized import float_twin, input_independent_layers, read_quantized
    from daptq_ros.model.io import NormStats

    ckpt = read_quantized(args.quantized)
    if ckpt.token_act_layers and args.flavour == "trt":
        raise ExportError(
            f"layers {ckpt.token_act_layers} use dynamic per-token activations, which have no static QDQ "
            "form for TensorRT; export with --flavour cpu (run-time activation scales) or re-quantize with "
            "act_granularity: tensor"
        )
    model = float_twin(ckpt)
    base = ckpt.base_meta
    norm = NormStats.from_dict(base["norm"]).to_dict()
    with tempfile.TemporaryDirectory(prefix="daptq_fp_") as tmp:
        export_policy(
            model,
            model.example_inputs(1),
            Path(tmp),
            norm=norm,
            instructions_cache=_instruction_source(args, args.quantized, list(base.get("instructions", []))),
            config_meta={"checkpoint": str(args.quantized), "model": base.get("config", {})},
            method=ckpt.method,
            opset=args.opset,
            prefer_dynamo=not args.legacy_exporter,
        )
        return export_qdq(
            tmp,
            ckpt.plan,
            args.out,
            flavour=args.flavour,
            method=ckpt.method,
            budget=ckpt.budget,
            avg_bits=ckpt.avg_bits,
            extra_config={"recipe": ckpt.meta.get("recipe", {})},
            folded=input_independent_layers(model, [lq.name for lq in ckpt.plan]),
            cpu_options=CpuOptions(
                weight_only=args.cpu_weight_only,
                accuracy_level=args.cpu_accuracy_level,
                conv=args.cpu_conv,
                u8_weights=args.cpu_u8_weights,
            ),
        )


def run(args: argparse.Namespace) -> int:
    """Export; returns 0 on success, 2 on a bad input (message logged)."""
    try:
        source = args.checkpoint or args.quantized
        if not source.is_file():
            raise ExportError(f"checkpoint not found: {source}")
        manifest = _export_fp(args, source, args.out) if args.checkpoint else _export_quantized(args)
    except (ExportError, FileNotFoundError) as err:
        logger.error("export failed: %s", err)
        return 2
    summary = {
        "out": str(args.out),
        "method": manifest.method,
        "flavour": manifest.flavour,
        "avg_bits": manifest.avg_bits,
        "quantized_layers": len(manifest.layers),
        "model_bytes": (args.out / "model.onnx").stat().st_size,
        "sha256": manifest.model_sha256,
    }
    print(
        f"exported {summary['method']} ({summary['flavour']}, avg {summary['avg_bits']:.2f} bits, "
        f"{summary['quantized_layers']} quantized layers, {summary['model_bytes'] / 1024:.0f} KiB) "
        f"-> {args.out}"
    )
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2) + "\n")
    return 0
