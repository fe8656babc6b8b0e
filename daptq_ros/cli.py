"""The `daptq` command and the per-tool entry points used by `ros2 run daptq_ros NAME`.

Each subcommand lives in its own module that exposes ``HELP`` (one line), ``add_arguments(parser)``
and ``run(args) -> int``. Modules are imported lazily so that ``daptq --help`` is fast and an
optional dependency (Meta-World, rclpy) is only needed by the subcommand that uses it.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

from daptq_ros import __version__

# subcommand name -> module implementing it (HELP, add_arguments, run).
SUBCOMMANDS: dict[str, str] = {
    "quantize": "daptq_ros.quant.cli",
    "export": "daptq_ros.export.cli",
    "evaluate": "daptq_ros.sim.evaluate_cli",
    "bench": "daptq_ros.runtime.bench",
    "record": "daptq_ros.drift.record_cli",
    "drift-check": "daptq_ros.drift.cli",
    "launch": "daptq_ros.launcher",
    "sim": "daptq_ros.sim.cli",
    "train": "daptq_ros.model.train_cli",
    "experiment": "daptq_ros.quant.experiment",
    "demo": "daptq_ros.demo",
}

# One-line help shown by `daptq --help` without importing the (heavy) subcommand modules.
SUBCOMMAND_HELP: dict[str, str] = {
    "quantize": "quantize a policy (DA-PTQ and baselines) from a YAML recipe",
    "export": "export a (quantized) policy to ONNX with QDQ nodes plus manifest.json",
    "evaluate": "closed-loop Meta-World evaluation: success with CI and kinematic drift",
    "bench": "side-by-side latency/size benchmarks (ONNX Runtime CPU, torch GPU)",
    "record": "record policy topics to a rosbag2 file (MCAP or sqlite3)",
    "drift-check": "replay a bag through two artifacts; per-DoF drift report and pass/fail gate",
    "launch": "start the policy node graph (with --sim: plus the Meta-World bridge) without ros2 launch",
    "sim": "simulation tools: scripted demonstrations",
    "train": "train the reference VLA policy on demonstrations",
    "experiment": "methods x budgets x closed-loop evaluation table",
    "demo": "the end-to-end demo: quantize -> export -> ROS loop on the simulated robot -> summary",
}

LOG_FORMAT = "[%(levelname)s] [%(asctime)s] [%(name)s]: %(message)s"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="daptq",
        description="Drift-aware post-training quantization and ROS 2 deployment for VLA policies.",
    )
    parser.add_argument("--version", action="version", version=f"daptq_ros {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, help_text in SUBCOMMAND_HELP.items():
        sub.add_parser(name, help=help_text, add_help=False)
    return parser


def _load(name: str):
    return importlib.import_module(SUBCOMMANDS[name])


def run_subcommand(name: str, argv: Sequence[str], prog: str | None = None) -> int:
    """Parse ``argv`` for subcommand ``name`` and run it; returns the exit code."""
    module = _load(name)
    parser = argparse.ArgumentParser(prog=prog or f"daptq {name}", description=module.HELP)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    module.add_arguments(parser)
    args = parser.parse_args(list(argv))
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format=LOG_FORMAT)
    try:
        return int(module.run(args) or 0)
    except KeyboardInterrupt:
        return 130


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if not argv or argv[0] in ("-h", "--help"):
        parser.print_help()
        return 0
    if argv[0] == "--version":
        parser.parse_args(argv)
    if argv[0] in ("-v", "--verbose"):
        argv = [*argv[1:], "--verbose"]
    if argv[0] not in SUBCOMMANDS:
        parser.error(f"unknown command {argv[0]!r}; choose from {', '.join(SUBCOMMANDS)}")
    return run_subcommand(argv[0], argv[1:])


def _entry(name: str, prog: str):
    def entry() -> None:
        sys.exit(run_subcommand(name, sys.argv[1:], prog=prog))

    entry.__doc__ = f"Console script for `{prog}` (= `daptq {name}`)."
    return entry


quantize_main = _entry("quantize", "quantize")
export_main = _entry("export", "export")
evaluate_main = _entry("evaluate", "evaluate")
bench_main = _entry("bench", "bench")
record_main = _entry("record", "record")
drift_check_main = _entry("drift-check", "drift_check")


if __name__ == "__main__":
    sys.exit(main())
