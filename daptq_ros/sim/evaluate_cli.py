"""`daptq evaluate`: closed-loop Meta-World MT10 evaluation with kinematic drift metrics."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from daptq_ros.sim.tasks import EVAL_SEED_START

logger = logging.getLogger(__name__)

HELP = "closed-loop Meta-World evaluation: success with 95% CI and kinematic drift vs a reference"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the `evaluate` options."""
    parser.add_argument("--policy", required=True,
                        help="'expert', an artifact directory (manifest.json) or a .safetensors checkpoint")
    parser.add_argument("--reference", default=None,
                        help="reference policy spec for drift metrics (same forms as --policy)")
    parser.add_argument("--tasks", default="all", help="'all' or comma-separated MT10 task names")
    parser.add_argument("--episodes", type=int, default=20, help="episodes (seeds) per task")
    parser.add_argument("--seed", type=int, default=EVAL_SEED_START,
                        help="first layout seed (default 100000: never used by demonstrations)")
    parser.add_argument("--workers", type=int, default=2, help="worker processes (1 = in-process)")
    parser.add_argument("--max-steps", type=int, default=200, help="step cap per episode")
    parser.add_argument("--image-size", type=int, default=128, help="main camera render size")
    parser.add_argument("--camera", default="corner4", help="main camera name")
    parser.add_argument("--wrist-camera", default=None, help="optional wrist camera (e.g. gripperPOV)")
    parser.add_argument("--noise-seed", type=int, default=0, help="seed of the open-loop probe noise")
    parser.add_argument("--policy-threads", type=int, default=1,
                        help="CPU inference threads per policy (0 = library default); 1 avoids "
                        "oversubscribing the cores shared with rendering and other workers")
    parser.add_argument("--json", type=Path, default=None, help="write the full result object here")
    parser.add_argument("--trajectories", type=Path, default=None,
                        help="directory for per-episode trajectories (<task>/<task>_s<seed>.npz)")


def run(args: argparse.Namespace) -> int:
    """Run the evaluation, print the per-task table, optionally write JSON; 2 on bad input."""
    from daptq_ros.sim.evaluate import EvalConfig, evaluate, format_table
    from daptq_ros.sim.tasks import parse_tasks

    try:
        config = EvalConfig(
            tasks=tuple(parse_tasks(args.tasks)), episodes=args.episodes, seed=args.seed,
            max_steps=args.max_steps, image_size=args.image_size, camera=args.camera,
            wrist_camera=args.wrist_camera, workers=args.workers, noise_seed=args.noise_seed,
            policy_threads=args.policy_threads or None,
        )
        result = evaluate(args.policy, args.reference, config, trajectories=args.trajectories)
    except (ValueError, FileNotFoundError) as err:
        logger.error("%s", err)
        return 2
    print(format_table(result))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))
        logger.info("wrote %s", args.json)
    return 0
