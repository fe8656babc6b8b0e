"""`daptq launch policy [--sim]`: the launch/policy.launch.py node graph without `ros2 launch`.

``launch``/``launch_ros`` are not installable from PyPI, so this starts the same nodes as
separate OS processes with the same params file and remappings as the launch file (a test
compares the two; edit both together):

    policy_node  --ros-args -r __ns:=NS --params-file FILE -p artifact_dir:=DIR -r ~/image:=...
    sim_bridge   --ros-args -r __ns:=NS --params-file FILE -p tasks:=[...] ...      (with --sim)

It forwards SIGINT/SIGTERM to the children, collects the sim bridge's episode results, prints a
per-episode summary plus totals (``--json PATH`` for machine-readable output) and exits
non-zero when a node crashed or the sim did not complete. This module does not import rclpy.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

HELP = "start the policy node graph (with --sim: plus the Meta-World bridge) without ros2 launch"

PACKAGE = "daptq_ros"
LAUNCH_FILE = "policy.launch.py"
DEFAULT_PARAMS = "config/policy.yaml"
"""Params file, relative to the repository root / the package's share directory."""

# node name -> console script (= launch_ros Node executable) and module run by this launcher.
NODES: dict[str, str] = {"policy_node": "policy_node", "sim_bridge": "sim_bridge"}
NODE_MODULES: dict[str, str] = {
    "policy_node": "daptq_ros.nodes.policy_node",
    "sim_bridge": "daptq_ros.nodes.sim_bridge",
}

# Relative topic names: they resolve inside the namespace. launch/policy.launch.py repeats
# these literals (launch files must not import the package); test_launch_consistency compares.
REMAPPINGS: dict[str, list[tuple[str, str]]] = {
    "policy_node": [
        ("~/image", "camera/image"),
        ("~/instruction", "instruction"),
        ("~/joint_states", "joint_states"),
        ("~/joint_command", "joint_command"),
        ("~/ee_command", "ee_command"),
    ],
    "sim_bridge": [
        ("~/image", "camera/image"),
        ("~/instruction", "instruction"),
        ("~/joint_states", "joint_states"),
        ("~/command", "joint_command"),
    ],
}

STOP_TIMEOUT_S = 10.0


def default_params_file() -> Path:
    """The shipped params file: repository checkout first, then the ament share directory."""
    repo = Path(__file__).resolve().parent.parent / DEFAULT_PARAMS
    if repo.is_file():
        return repo
    try:
        from ament_index_python.packages import get_package_share_directory

        return Path(get_package_share_directory(PACKAGE)) / DEFAULT_PARAMS
    except Exception:  # not installed with colcon: fall back to the (missing) repo path
        return repo


def ros_args(node: str, params_files: list[Path], namespace: str) -> list[str]:
    """``--ros-args`` list for ``node``: name, namespace, params files (later ones win), remappings."""
    args = ["--ros-args", "-r", f"__node:={node}"]
    if namespace.strip("/"):
        args += ["-r", f"__ns:=/{namespace.strip('/')}"]
    for path in params_files:
        args += ["--params-file", str(path)]
    for src, dst in REMAPPINGS[node]:
        args += ["-r", f"{src}:={dst}"]
    return args


def node_command(node: str, params_files: list[Path], namespace: str) -> list[str]:
    """Full argv starting ``node`` with this interpreter (no console script needed)."""
    return [sys.executable, "-m", NODE_MODULES[node], *ros_args(node, params_files, namespace)]


def write_overrides(overrides: dict[str, dict[str, Any]], path: Path) -> Path:
    """Write command-line overrides as a params file passed *after* the main one.

    A node-specific section of the main file would take precedence over ``-p`` (global)
    overrides, so overrides go into ``/**/NODE`` sections of a later file, which win.
    """
    import yaml

    data = {f"/**/{node}": {"ros__parameters": values} for node, values in overrides.items() if values}
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("graph", choices=["policy"], help="node graph to start (policy)")
    parser.add_argument("--sim", action="store_true", help="also start the Meta-World sim_bridge")
    parser.add_argument("--artifact", required=True, help="exported artifact directory")
    parser.add_argument("--params", default=None, help=f"ROS 2 params file (default: {DEFAULT_PARAMS})")
    parser.add_argument("--namespace", default="", help="ROS namespace of both nodes")
    parser.add_argument("--tasks", default=None, help="sim: comma-separated MT10 tasks or 'all'")
    parser.add_argument("--episodes", type=int, default=None, help="sim: episodes per task")
    parser.add_argument("--max-steps", type=int, default=None, help="sim: step cap per episode")
    parser.add_argument("--seed-start", type=int, default=None, help="sim: first layout seed")
    parser.add_argument("--set", action="append", default=[], metavar="NODE:KEY:=VALUE",
                        help="extra parameter override, e.g. policy_node:control_rate_hz:=30.0")
    parser.add_argument("--log-dir", default=None, help="write node stdout/stderr to DIR/<node>.log")
    parser.add_argument("--timeout", type=float, default=0.0,
                        help="stop everything after this many seconds (0 = no limit)")
    parser.add_argument("--json", default=None, help="write episodes + summary + exit codes as JSON")


@dataclass
class _Proc:
    name: str
    popen: subprocess.Popen
    log: Any = None


def _overrides(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """Parameter overrides from the command line, type-checked against the node specs."""
    import yaml

    from daptq_ros.nodes.params import NODE_SPECS, ParamError, check_value

    out: dict[str, dict[str, Any]] = {"policy_node": {"artifact_dir": str(Path(args.artifact).resolve())},
                                      "sim_bridge": {}}
    sim = out["sim_bridge"]
    if args.tasks:
        from daptq_ros.sim.tasks import parse_tasks

        sim["tasks"] = parse_tasks(args.tasks)
    for key, value in (("episodes_per_task", args.episodes), ("max_steps", args.max_steps),
                       ("seed_start", args.seed_start)):
        if value is not None:
            sim[key] = int(value)
    for item in args.set:
        node, sep, rest = item.partition(":")
        if not sep or node not in NODES or ":=" not in rest:
            raise ValueError(f"--set {item!r}: expected NODE:KEY:=VALUE with NODE in {sorted(NODES)}")
        key, _, value = rest.partition(":=")
        out[node][key] = yaml.safe_load(value)
    for node, values in out.items():
        specs = {s.name: s for s in NODE_SPECS[node]}
        for key, value in values.items():
            if key not in specs:
                raise ParamError(key, f"unknown parameter of {node} (--set)")
            check_value(specs[key], value)
    return out


def _start(name: str, argv: list[str], log_dir: Path | None) -> _Proc:
    """Start one node; its output goes to DIR/<node>.log, or to our stderr (stdout stays the
    launcher's summary)."""
    log = None
    if log_dir is not None:
        log_dir.mkdir(parents=True, exist_ok=True)
        log = (log_dir / f"{name}.log").open("w")
    logger.info("starting %s: %s", name, " ".join(argv))
    popen = subprocess.Popen(argv, stdout=log or sys.stderr, stderr=subprocess.STDOUT if log else None,
                             start_new_session=True)
    return _Proc(name, popen, log)


def _stop(proc: _Proc, sig: int = signal.SIGINT) -> int:
    """Signal a child, escalate to SIGTERM/SIGKILL after STOP_TIMEOUT_S; returns its exit code."""
    if proc.popen.poll() is None:
        for s in (sig, signal.SIGTERM, signal.SIGKILL):
            try:
                proc.popen.send_signal(s)
            except ProcessLookupError:
                break
            try:
                proc.popen.wait(STOP_TIMEOUT_S)
                break
            except subprocess.TimeoutExpired:
                logger.warning("%s did not stop on %s", proc.name, signal.Signals(s).name)
    rc = proc.popen.wait()
    if proc.log is not None:
        proc.log.close()
    return rc


def _clean_exit(rc: int) -> bool:
    """Exit code of a node *we* stopped: 0/130 (SIGINT handled) or death by our SIGINT/SIGTERM
    (e.g. still importing); anything else (an exception at shutdown, SIGKILL after a hang) is not."""
    return rc in (0, 130, -signal.SIGINT, -signal.SIGTERM)


def read_results(path: Path) -> tuple[list[dict[str, Any]], dict[str, Any] | None]:
    """Episode records and the summary record from a sim_bridge ``results_path`` file."""
    episodes, summary = [], None
    if path.is_file():
        for line in path.read_text().splitlines():
            if line.strip():
                rec = json.loads(line)
                if rec.get("type") == "summary":
                    summary = rec
                else:
                    episodes.append(rec)
    return episodes, summary


def run(args: argparse.Namespace) -> int:
    from daptq_ros.nodes.params import ParamError, read_params_file

    params_file = Path(args.params) if args.params else default_params_file()
    try:
        read_params_file(params_file)
        overrides = _overrides(args)
    except (ParamError, FileNotFoundError, ValueError) as err:
        print(f"daptq launch: {err}", file=sys.stderr)
        return 2
    if not Path(args.artifact).is_dir():
        print(f"daptq launch: --artifact {args.artifact} is not a directory", file=sys.stderr)
        return 2
    log_dir = Path(args.log_dir) if args.log_dir else None
    work = Path(tempfile.mkdtemp(prefix="daptq_launch_"))
    results_file = work / "episodes.jsonl"
    overrides["sim_bridge"]["results_path"] = str(results_file)
    files = [params_file, write_overrides(overrides, work / "overrides.yaml")]
    procs = [_start("policy_node", node_command("policy_node", files, args.namespace), log_dir)]
    if args.sim:
        procs.append(_start("sim_bridge", node_command("sim_bridge", files, args.namespace), log_dir))
    stop_requested: list[int] = []

    def _forward(signum: int, _frame: Any) -> None:
        stop_requested.append(signum)

    old = {s: signal.signal(s, _forward) for s in (signal.SIGINT, signal.SIGTERM)}
    codes: dict[str, int] = {}
    crashed: list[str] = []
    deadline = time.monotonic() + args.timeout if args.timeout > 0 else None
    try:
        while True:
            if stop_requested:
                logger.info("signal %s received: stopping nodes", stop_requested[0])
                break
            if deadline is not None and time.monotonic() > deadline:
                logger.error("--timeout %.0f s reached: stopping nodes", args.timeout)
                crashed.append("timeout")
                break
            done = [p for p in procs if p.popen.poll() is not None]
            if any(p.name == "sim_bridge" for p in done):
                break
            if any(p.name == "policy_node" for p in done):
                break
            time.sleep(0.1)
    finally:
        for proc in reversed(procs):
            exited_alone = proc.popen.poll() is not None
            codes[proc.name] = rc = _stop(proc, stop_requested[0] if stop_requested else signal.SIGINT)
            if exited_alone:
                # the policy node runs until stopped; the sim bridge exits 0 when it is done
                if proc.name == "policy_node" or rc != 0:
                    crashed.append(proc.name)
            elif not _clean_exit(rc):
                crashed.append(proc.name)
        for s, handler in old.items():
            signal.signal(s, handler)
    episodes, summary = read_results(results_file)
    shutil.rmtree(work, ignore_errors=True)
    _report(episodes, summary, codes, crashed, args)
    if crashed:
        return 1
    if args.sim and (summary is None or codes.get("sim_bridge") != 0):
        return 1
    return 130 if stop_requested and not args.sim else 0


def _report(episodes: list[dict[str, Any]], summary: dict[str, Any] | None, codes: dict[str, int],
            crashed: list[str], args: argparse.Namespace) -> None:
    if episodes or summary:
        from daptq_ros.nodes.summary import format_summary, summarize

        print(format_summary(episodes, summary or summarize(episodes)))
    for name, rc in codes.items():
        state = "CRASHED" if name in crashed else "ok"
        print(f"{name}: exit code {rc} ({state})")
    if "timeout" in crashed:
        print(f"timeout after {args.timeout:.0f} s")
    if args.json:
        out = {"episodes": episodes, "summary": summary, "exit_codes": codes, "crashed": crashed,
               "artifact": str(Path(args.artifact).resolve()), "namespace": args.namespace,
               "pid": os.getpid()}
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=2))
