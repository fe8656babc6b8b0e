"""`daptq sim`: simulation tools (scripted demonstrations)."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from daptq_ros.sim.tasks import DEMO_SEED_START

logger = logging.getLogger(__name__)

HELP = "simulation tools: scripted Meta-World MT10 demonstrations"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the `sim` sub-subcommands (currently `demos`)."""
    sub = parser.add_subparsers(dest="sim_command", metavar="SIM_COMMAND", required=True)
    demos = sub.add_parser(
        "demos",
        help="run the scripted experts and store successful episodes (resumable)",
        description="Run Meta-World's scripted experts and store successful episodes as "
        "DIR/<task>/<task>_s<seed>.npz (resumable: existing episodes are kept).",
    )
    demos.add_argument("--out", required=True, type=Path, help="dataset directory")
    demos.add_argument("--tasks", default="all", help="'all' or comma-separated MT10 task names")
    demos.add_argument("--episodes-per-task", type=int, default=50, help="successful episodes per task")
    demos.add_argument("--seed", type=int, default=DEMO_SEED_START,
                       help="first layout seed (seeds seed, seed+1, ...; keep below 100000, the eval seeds)")
    demos.add_argument("--workers", type=int, default=2, help="worker processes (1 = in-process)")
    demos.add_argument("--image-size", type=int, default=128, help="corner4 render size (pixels)")
    demos.add_argument("--max-steps", type=int, default=200, help="step cap; failed episodes are dropped")
    demos.add_argument(
        "--max-extra-seeds", type=int, default=None,
        help="failed episodes tolerated per task before giving up (default: max(5, episodes-per-task))",
    )
    demos.add_argument("--json", type=Path, default=None, help="write the per-task summary as JSON")


def run(args: argparse.Namespace) -> int:
    """Run the selected `sim` command; returns 0 when every task got its episodes."""
    if args.sim_command != "demos":  # pragma: no cover - argparse enforces the choices
        raise ValueError(f"unknown sim command {args.sim_command!r}")
    from daptq_ros.sim.demos import generate_demos
    from daptq_ros.sim.tasks import parse_tasks

    try:
        tasks = parse_tasks(args.tasks)
        summaries = generate_demos(
            args.out, tasks, episodes_per_task=args.episodes_per_task, seed=args.seed,
            workers=args.workers, image_size=args.image_size, max_steps=args.max_steps,
            max_extra_seeds=args.max_extra_seeds,
        )
    except ValueError as err:
        logger.error("%s", err)
        return 2
    header = f"{'task':<26}{'have':>6}{'new':>6}{'failed':>8}{'mean steps':>12}"
    print(header)
    print("-" * len(header))
    for s in summaries:
        mean_steps = f"{sum(s.steps) / len(s.steps):.1f}" if s.steps else "-"
        print(f"{s.task:<26}{s.available:>6}{s.written:>6}{len(s.failed_seeds):>8}{mean_steps:>12}")
    short = [s.task for s in summaries if not s.complete]
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({
            "out": str(args.out), "episodes_per_task": args.episodes_per_task, "seed": args.seed,
            "max_steps": args.max_steps, "image_size": args.image_size,
            "tasks": {s.task: {"available": s.available, "existing": s.existing, "written": s.written,
                               "failed_seeds": s.failed_seeds, "steps": s.steps} for s in summaries},
            "incomplete": short,
        }, indent=2))
    if short:
        logger.error("tasks short of %d episodes: %s", args.episodes_per_task, ", ".join(short))
        return 1
    return 0
