"""``daptq quantize`` (= ``ros2 run daptq_ros quantize``): recipe -> quantized checkpoint + report.

Policies: the reference VLA from ``--checkpoint`` (calibration from ``--demos`` or
``--calib-bag``), or any policy through ``--policy MODULE:FUNCTION``, a provider called with the
parsed args that returns ``{"model", "adapter", "calib_batches", "base", "model_factory"?}``
(see :func:`daptq_ros.quant.toy.toy_vla_provider`). CLI flags override recipe keys.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import shutil
import subprocess
from pathlib import Path
from typing import Any

from daptq_ros.config_util import ConfigError

logger = logging.getLogger(__name__)

HELP = "quantize a policy (DA-PTQ and baselines) from a YAML recipe"
DEFAULT_CONFIG = "config/quantize.yaml"
CHECKPOINT_NAME = "quantized.safetensors"
INSTRUCTIONS_FILE = "instructions.safetensors"
# The shipped reference policy (its instruction cache lies next to it).
DEFAULT_CHECKPOINT = Path(__file__).resolve().parents[1] / "assets" / "reference_vla.safetensors"


NO_BUDGET = "none"


def _budget(text: str) -> float | str:
    if text.lower() in ("none", "null"):
        return NO_BUDGET
    try:
        return float(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"--budget must be a number or 'none', got {text!r}") from err


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default=DEFAULT_CONFIG, help="recipe YAML (default: %(default)s)")
    parser.add_argument(
        "--checkpoint",
        help="FP checkpoint (.safetensors) of the policy; its instructions.safetensors is read from the "
        "same directory (default with --demos/--calib-bag: the shipped reference policy)",
    )
    src = parser.add_mutually_exclusive_group()
    src.add_argument("--demos", help="demo directory for calibration frames (DIR/<task>/*.npz)")
    src.add_argument("--calib-bag", help="rosbag2 recording for calibration frames")
    parser.add_argument(
        "--policy", help="custom policy provider MODULE:FUNCTION (instead of the reference VLA)"
    )
    parser.add_argument("--out", default="quantized", help="output directory (default: %(default)s)")
    parser.add_argument("--method", help="override recipe.method")
    parser.add_argument(
        "--budget",
        type=_budget,
        help="override recipe.budget (average bits per weight; 'none' = no budget, uniform --w-bits)",
    )
    parser.add_argument("--w-bits", type=int, help="override recipe.w_bits")
    parser.add_argument("--calib-frames", type=int, help="override recipe.calib_frames")
    parser.add_argument("--json", help="also write the result summary JSON here")


def _git_rev() -> str | None:
    try:
        return subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, check=True
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


def _load_provider(spec: str):
    module_name, _, func = spec.partition(":")
    if not module_name or not func:
        raise ConfigError(f"--policy must be MODULE:FUNCTION, got {spec!r}")
    try:
        return getattr(importlib.import_module(module_name), func)
    except (ImportError, AttributeError) as err:
        raise ConfigError(f"--policy {spec!r} cannot be imported: {err}") from err


def _reference_bundle(args: argparse.Namespace, recipe: Any) -> dict[str, Any]:
    """The reference VLA, its adapter and calibration batches (other sub-packages, lazily)."""
    from daptq_ros.model.adapter import ReferenceVLAAdapter
    from daptq_ros.model.io import CheckpointError as ModelCheckpointError
    from daptq_ros.model.io import load_checkpoint

    if not args.checkpoint:
        args.checkpoint = str(DEFAULT_CHECKPOINT)
    try:
        loaded = load_checkpoint(args.checkpoint)
    except (FileNotFoundError, ModelCheckpointError) as err:
        raise ConfigError(f"--checkpoint: {err}") from err
    adapter = ReferenceVLAAdapter()
    if args.calib_bag:
        try:
            from daptq_ros.drift.bag_calibration import calibration_batches
        except ImportError as err:
            raise ConfigError(
                f"--calib-bag needs daptq_ros.drift.bag_calibration, unavailable: {err}"
            ) from err
        batches = calibration_batches(args.calib_bag, loaded, frames=recipe.calib_frames, seed=recipe.seed)
    elif args.demos:
        from daptq_ros.model.data import calibration_batches

        try:
            batches = calibration_batches(
                args.demos, loaded, n_frames=recipe.calib_frames, seed=recipe.seed, with_actions=True
            )
        except FileNotFoundError as err:
            raise ConfigError(f"--demos: {err}") from err
    else:
        raise ConfigError("calibration data needed: --demos DIR or --calib-bag BAG")
    return {"model": loaded.model, "adapter": adapter, "calib_batches": batches, "base": loaded.meta}


def _copy_instructions(checkpoint: str | None, out: Path) -> None:
    """Ship the instruction cache next to the quantized checkpoint (TorchPolicy/export read it there)."""
    if not checkpoint:
        return
    src = Path(checkpoint).parent / INSTRUCTIONS_FILE
    if src.is_file() and src.resolve() != (out / INSTRUCTIONS_FILE).resolve():
        shutil.copyfile(src, out / INSTRUCTIONS_FILE)


def run(args: argparse.Namespace) -> int:
    from daptq_ros.quant.adapter import AdapterError
    from daptq_ros.quant.api import quantize_policy
    from daptq_ros.quant.budget import BudgetError
    from daptq_ros.quant.calibration import CalibrationError
    from daptq_ros.quant.checkpoint import CheckpointError, save_quantized
    from daptq_ros.quant.recipe import load_recipe
    from daptq_ros.quant.registry import UnknownMethodError
    from daptq_ros.quant.report import write_report

    try:
        config = args.config if Path(args.config).is_file() or args.config != DEFAULT_CONFIG else None
        recipe = load_recipe(
            config,
            method=args.method,
            budget=None if args.budget == NO_BUDGET else args.budget,
            w_bits=args.w_bits,
            calib_frames=args.calib_frames,
        )
        if args.budget == NO_BUDGET:
            recipe.budget = None
        bundle = _load_provider(args.policy)(args) if args.policy else _reference_bundle(args, recipe)
        model = bundle["model"]
        result = quantize_policy(model, bundle["adapter"], bundle["calib_batches"], recipe)
        out = Path(args.out)
        provenance = {
            "command": "daptq quantize",
            "config": args.config,
            "checkpoint": args.checkpoint,
            "policy": args.policy,
            "demos": args.demos,
            "calib_bag": args.calib_bag,
            "git": _git_rev(),
        }
        ckpt = save_quantized(out / CHECKPOINT_NAME, model, result, bundle.get("base"), provenance)
        _copy_instructions(args.checkpoint, out)
        paths = write_report(result, out, {"checkpoint": str(ckpt), "provenance": provenance})
    except (
        ConfigError,
        AdapterError,
        CalibrationError,
        BudgetError,
        UnknownMethodError,
        CheckpointError,
    ) as err:
        logger.error("%s", err)
        return 2
    summary = {
        "checkpoint": str(ckpt),
        "report": str(paths["md"]),
        "method": result.method,
        "avg_bits": result.avg_bits,
        "drift_loss": result.drift_loss,
        "size": result.size,
    }
    print(
        f"{result.method}: {result.avg_bits:.3f} avg bits, drift loss {result.drift_loss:.4g}, "
        f"{result.size['quant_bytes'] / 1024:.1f} KiB vs fp32 "
        f"{result.size['fp32_bytes'] / 1024:.1f} KiB -> {ckpt}"
    )
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2))
    return 0
