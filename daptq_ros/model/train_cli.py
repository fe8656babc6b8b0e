"""`daptq train`: train the reference VLA on demonstrations (see :mod:`daptq_ros.model.train`).

Example (GPU)::

    daptq train --demos data/demos --instructions daptq_ros/assets/instructions.safetensors \\
        --out runs/vla.safetensors --config config/model.yaml --steps 20000 --batch-size 256 \\
        --eval-every 5000 --eval-episodes 5 --log-json runs/train.json
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import shlex
import sys
from pathlib import Path
from typing import Any

import yaml

from daptq_ros.config_util import ConfigError, load_config
from daptq_ros.model.config import TrainConfig, VLAConfig

logger = logging.getLogger(__name__)

HELP = "train the reference VLA policy on demonstrations"
_SECTIONS = ("model", "train")


def load_model_file(path: str | Path | None) -> tuple[VLAConfig, TrainConfig]:
    """Read a model YAML with a ``model:`` section and an optional ``train:`` section."""
    if path is None:
        return VLAConfig(), TrainConfig()
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data: Any = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from err
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping with keys {list(_SECTIONS)}")
    unknown = sorted(set(data) - set(_SECTIONS))
    if unknown:
        raise ConfigError(f"{path}: unknown top-level key {unknown[0]!r} (valid: {', '.join(_SECTIONS)})")
    try:
        model = load_config(VLAConfig, data, section="model") if "model" in data else VLAConfig()
        train = load_config(TrainConfig, data, section="train") if "train" in data else TrainConfig()
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from err
    return model, train


def canonical_command(args: argparse.Namespace) -> str:
    """The run as one explicit ``daptq train`` command line (every option, resolved), plus argv.

    Reconstructed from the parsed options, so it is exact however the command was invoked
    (``daptq``, ``python -m daptq_ros.cli`` or from Python); the raw ``sys.argv`` is appended.
    """
    parts = ["daptq", "train"]
    for key, value in sorted(vars(args).items()):
        if key == "verbose" or value is None:
            continue
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            parts.append(flag if value else "--no-" + key.replace("_", "-"))
        else:
            parts += [flag, str(value)]
    return f"{shlex.join(parts)}  # argv: {shlex.join(sys.argv)}"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register the `daptq train` options."""
    parser.add_argument("--demos", required=True, type=Path, help="demo directory (DIR/<task>/*.npz)")
    parser.add_argument(
        "--instructions",
        required=True,
        type=Path,
        help="instruction feature cache (.safetensors, python -m daptq_ros.model.language)",
    )
    parser.add_argument("--out", required=True, type=Path, help="output checkpoint (.safetensors)")
    parser.add_argument(
        "--config",
        type=Path,
        default=None,
        help="model YAML with model:/train: sections (default: built-in defaults)",
    )
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps (overrides train.steps)")
    parser.add_argument(
        "--batch-size", type=int, default=None, help="frames per step (overrides train.batch_size)"
    )
    parser.add_argument("--lr", type=float, default=None, help="peak learning rate (overrides train.lr)")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default: auto)")
    parser.add_argument("--seed", type=int, default=0, help="run seed (split, init, sampling, noise)")
    parser.add_argument(
        "--eval-every",
        type=int,
        default=0,
        help="steps between closed-loop evaluations; 0 = select by validation loss",
    )
    parser.add_argument("--eval-episodes", type=int, default=5, help="episodes per task per evaluation")
    parser.add_argument(
        "--eval-workers", type=int, default=None, help="evaluation processes (default: cores)"
    )
    parser.add_argument(
        "--eval-seed",
        type=int,
        default=None,
        help="first layout seed of training-time evaluations (default 150000)",
    )
    parser.add_argument(
        "--eval-tasks", default="all", help="tasks of training-time evaluations (all or t1,t2; default all)"
    )
    parser.add_argument("--init", type=Path, default=None, help="warm-start from this checkpoint")
    parser.add_argument(
        "--time-limit",
        type=float,
        default=None,
        help="stop optimizing after this many seconds, then validate and save",
    )
    parser.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="torch.compile the loss with CUDA graphs (default: on for CUDA, off for CPU)",
    )
    parser.add_argument("--log-json", type=Path, default=None, help="write the training log (JSON) here")


def run(args: argparse.Namespace) -> int:
    """Run `daptq train`; returns the exit code."""
    from daptq_ros.model.io import CheckpointError
    from daptq_ros.model.language import UnknownInstructionError
    from daptq_ros.model.train import SELECTION_SEED_START, TrainRun, train

    try:
        model_cfg, train_cfg = load_model_file(args.config)
        overrides = {
            k: v
            for k, v in (("steps", args.steps), ("batch_size", args.batch_size), ("lr", args.lr))
            if v is not None
        }
        train_cfg = dataclasses.replace(train_cfg, **overrides)
    except (ConfigError, ValueError) as err:
        logger.error("%s", err)
        return 2
    if args.eval_every < 0 or args.eval_episodes < 1:
        logger.error("--eval-every must be >= 0 and --eval-episodes >= 1")
        return 2
    train_run = TrainRun(
        demos=args.demos,
        instructions=args.instructions,
        out=args.out,
        device=args.device,
        seed=args.seed,
        eval_every=args.eval_every,
        eval_episodes=args.eval_episodes,
        eval_workers=args.eval_workers,
        eval_seed=SELECTION_SEED_START if args.eval_seed is None else args.eval_seed,
        log_json=args.log_json,
        command=canonical_command(args),
        eval_tasks=args.eval_tasks,
        init=args.init,
        time_limit_s=args.time_limit,
        compile=args.compile,
    )
    try:
        summary = train(train_run, model_cfg, train_cfg)
    except (FileNotFoundError, CheckpointError, UnknownInstructionError, ValueError) as err:
        logger.error("%s", err)
        return 2
    best = summary["best"]
    print(
        f"checkpoint: {summary['checkpoint']} (step {best.get('step')}, val_loss {best.get('val_loss')}, "
        f"eval success {best.get('eval', {}).get('success_rate')})"
    )
    print(
        f"throughput: {summary['frames_per_s']:.0f} frames/s on {summary['device']}, "
        f"{summary['steps_done']} steps in {summary['wall_s']:.0f} s"
    )
    return 0
