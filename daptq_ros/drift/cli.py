"""`daptq drift-check` (= `ros2 run daptq_ros drift_check`): replay a bag through two artifacts.

Exit codes: 0 = within thresholds, 1 = thresholds exceeded, 2 = bad input (bag, artifacts,
config, report path). On bad input no report directory is created.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from daptq_ros.config_util import ConfigError
from daptq_ros.drift.bag_io import BagError

logger = logging.getLogger(__name__)

HELP = "replay a bag through two artifacts; per-DoF drift report and pass/fail gate"
EXIT_PASS, EXIT_FAIL, EXIT_BAD_INPUT = 0, 1, 2
TOPIC_KEYS = ("image", "instruction", "joint_states", "commands")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--bag", required=True, type=Path, help="rosbag2 directory (MCAP or sqlite3)")
    parser.add_argument(
        "--reference", required=True, type=Path, help="full-precision artifact dir (or .safetensors)"
    )
    parser.add_argument(
        "--candidate", required=True, type=Path, help="quantized artifact dir (or .safetensors)"
    )
    parser.add_argument(
        "--report", required=True, type=Path, help="output directory for report.md/json and plots"
    )
    parser.add_argument(
        "--thresholds",
        "--config",
        dest="config",
        type=Path,
        default=None,
        help="drift config YAML (topics, thresholds, kinematics; default: the shipped config/drift.yaml)",
    )
    parser.add_argument(
        "--topics",
        nargs="+",
        default=[],
        metavar="KEY=TOPIC",
        help="override topics: image=/cam instruction=/instr joint_states=/js commands=/a,/b "
        "(commands= with nothing after it: no command topics)",
    )
    parser.add_argument("--max-frames", type=int, default=None, help="replay at most N frames")
    parser.add_argument("--seed", type=int, default=None, help="noise seed (overrides the config)")
    parser.add_argument(
        "--every-frame",
        action="store_true",
        help="predict at every frame, not only at re-plan frames (denser horizon statistics, slower)",
    )
    parser.add_argument(
        "--threads", type=int, default=1, help="ONNX Runtime threads per artifact (default 1)"
    )
    parser.add_argument("--json", type=Path, default=None, help="also write the summary JSON here")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def apply_topic_overrides(config, overrides: list[str]) -> None:
    """Apply ``KEY=TOPIC`` overrides to ``config.topics``; a bad entry raises ConfigError."""
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or key not in TOPIC_KEYS:
            raise ConfigError(
                f"--topics entry {item!r} must be KEY=TOPIC with KEY in {', '.join(TOPIC_KEYS)}"
            )
        if key == "commands":
            config.topics.commands = [t for t in value.split(",") if t]
        elif not value:
            raise ConfigError(f"--topics {key}= needs a topic name")
        else:
            setattr(config.topics, key, value)


def run(args: argparse.Namespace) -> int:
    from daptq_ros.drift.check import PolicyLoadError, check_drift
    from daptq_ros.drift.config import default_config_path, load_drift_config
    from daptq_ros.drift.replay import ReplayError

    try:
        source = args.config if args.config is not None else default_config_path()
        logger.info("drift config: %s", source or "built-in defaults")
        config = load_drift_config(source)
        apply_topic_overrides(config, args.topics)
        if args.max_frames is not None:
            if args.max_frames < 1:
                raise ConfigError(f"--max-frames must be >= 1, got {args.max_frames}")
            config.replay.max_frames = args.max_frames
        if args.seed is not None:
            config.replay.seed = args.seed
        if args.every_frame:
            config.replay.every_frame = True
        summary = check_drift(
            args.bag,
            args.reference,
            args.candidate,
            args.report,
            config,
            progress=not args.no_progress,
            threads=args.threads,
        )
    except (BagError, ConfigError, PolicyLoadError, ReplayError, FileExistsError) as err:
        logger.error("%s", err)
        return EXIT_BAD_INPUT
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(summary, indent=2, allow_nan=False) + "\n")
    verdict = "PASS" if summary["passed"] else "FAIL"
    print(
        f"drift check {verdict}: {summary['frames']} frames, {summary['episodes']} episodes, "
        f"max drift {summary['drift']['max_m'] * 100:.3f} cm; report: {args.report / 'report.md'}"
    )
    for check in summary["gate"]:
        if not check["passed"]:
            print(f"  FAILED {check['name']}: {check['value']} > limit {check['limit']}")
    return EXIT_PASS if summary["passed"] else EXIT_FAIL
