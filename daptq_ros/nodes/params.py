"""Parameters of ``policy_node`` and ``sim_bridge``: one spec table, pure-Python validation.

This module never imports rclpy, so the validation rules are testable without ROS and the
launcher can check a params file before it starts any process. The nodes declare every
parameter from these tables (with a ``ParameterDescriptor`` carrying description and range),
read the values back and hand them to :func:`validate_policy_params` /
:func:`validate_sim_params`, which return frozen dataclasses or raise :class:`ParamError`
naming the bad parameter.

Per-DoF lists (``action_scale``, ``action_min``, ...) hold either one value (applied to every
action dimension) or one value per action dimension; their length is checked against the model
once it is loaded (:func:`per_dof`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import yaml

from daptq_ros.policy_api import ACTION_NAMES, PROPRIO_NAMES

# Parameters every ROS 2 node has without declaring them.
BUILTIN_PARAMS: frozenset[str] = frozenset({"use_sim_time", "start_type_description_service"})
KINDS = ("bool", "int", "float", "str", "float_list", "str_list")


class ParamError(ValueError):
    """A node parameter is invalid; ``name`` is the parameter, the message says why."""

    def __init__(self, name: str, message: str) -> None:
        super().__init__(f"parameter '{name}': {message}")
        self.name = name


@dataclass(frozen=True)
class ParamSpec:
    """One declared node parameter.

    Attributes:
        name: parameter name (dots for nested YAML keys).
        kind: one of :data:`KINDS`.
        default: default value; ``None`` means "not set" (declared by type only).
        description: shown by ``ros2 param describe``.
        low / high: inclusive numeric range (for lists: every element), None = unbounded.
        choices: allowed string values (empty = any).
    """

    name: str
    kind: str
    default: Any
    description: str
    low: float | None = None
    high: float | None = None
    choices: tuple[str, ...] = ()


_REL = ("reliable", "best_effort")

POLICY_NODE_SPECS: tuple[ParamSpec, ...] = (
    # ---- lifecycle / model
    ParamSpec("autostart", "bool", True, "configure and activate on start (plain `ros2 run`)"),
    ParamSpec("artifact_dir", "str", "", "exported artifact directory (model.onnx + manifest.json)"),
    ParamSpec("providers", "str_list", ["tensorrt", "cuda", "cpu"],
              "ONNX Runtime execution providers in order of preference (first available wins)"),
    ParamSpec("intra_op_threads", "int", 1, "ONNX Runtime intra-op threads (0 = ORT default)", 0, 256),
    ParamSpec("seed", "int", 0, "seed of the flow-head noise generator (incremented per instruction)",
              0, 2**31 - 1),
    # ---- control loop
    ParamSpec("control_rate_hz", "float", 10.0, "control loop rate (Hz)", 0.1, 1000.0),
    ParamSpec("trigger", "str", "timer",
              "timer: step at control_rate_hz on the latest inputs; image: step on each new image "
              "(+ joint_states) pair",
              choices=("timer", "image")),
    ParamSpec("require_new_inputs", "bool", True,
              "timer trigger: act only when a new image and new joint_states arrived since the last step"),
    ParamSpec("chunk_mode", "str", "execute", "chunk execution: execute k of H, or temporal ensembling",
              choices=("execute", "ensemble")),
    ParamSpec("execute_steps", "int", 4, "actions executed per predicted chunk (execute mode)", 1, 4096),
    ParamSpec("ensemble_decay", "float", 0.1, "exp(-decay * age) weights (ensemble mode)", 0.0, 100.0),
    # ---- inputs
    ParamSpec("image_encoding", "str", "any", "expected image encoding (any = every supported one)",
              choices=("any", "rgb8", "bgr8", "mono8", "rgba8", "bgra8")),
    ParamSpec("image_width", "int", 0, "expected image width (0 = any; resized to the model size)",
              0, 16384),
    ParamSpec("image_height", "int", 0, "expected image height (0 = any)", 0, 16384),
    ParamSpec("proprio_joint_names", "str_list", list(PROPRIO_NAMES),
              "joint_states names read, in order, as the model's proprio vector"),
    ParamSpec("stale_input_timeout_s", "float", 0.5,
              "image/joint_states older than this are stale", 0.001, 3600.0),
    ParamSpec("fault_action", "str", "hold",
              "on stale input or a failed/non-finite inference: hold (re-send the last command), "
              "zero (send the zero action), none (send nothing); nothing before the first command",
              choices=("hold", "zero", "none")),
    ParamSpec("default_instruction", "str", "",
              "instruction used until one arrives on ~/instruction (empty = publish nothing)"),
    ParamSpec("max_instruction_bytes", "int", 1024, "longer instructions are rejected", 1, 1 << 20),
    ParamSpec("encode_unknown_instructions", "bool", True,
              "encode instructions missing from the artifact's cache with MiniLM (in the background, "
              "when installed); false = reject them"),
    # ---- outputs
    ParamSpec("output_mode", "str", "joint", "joint -> ~/joint_command, ee -> ~/ee_command",
              choices=("joint", "ee")),
    ParamSpec("joint_msg_type", "str", "joint_state", "message type of ~/joint_command",
              choices=("joint_state", "joint_trajectory")),
    ParamSpec("ee_msg_type", "str", "twist", "message type of ~/ee_command (pose = hand + action)",
              choices=("twist", "pose")),
    ParamSpec("joint_names", "str_list", None, "command joint names (default: manifest action_names)"),
    ParamSpec("frame_id", "str", "base_link", "frame_id of published commands"),
    ParamSpec("gripper_index", "int", 3, "ee mode: action index sent on ~/gripper_command (-1 = none)",
              -1, 4096),
    ParamSpec("action_scale", "float_list", [1.0], "per-DoF scale applied to raw actions (1 or A values)"),
    ParamSpec("action_offset", "float_list", [0.0], "per-DoF offset added after scaling"),
    ParamSpec("action_min", "float_list", [-1.0], "per-DoF lower limit (after scaling)"),
    ParamSpec("action_max", "float_list", [1.0], "per-DoF upper limit (after scaling)"),
    ParamSpec("max_delta", "float_list", [0.0], "per-DoF max change per step (0 = unlimited)", 0.0),
    # ---- QoS / diagnostics
    ParamSpec("image_qos_reliability", "str", "best_effort", "QoS reliability of ~/image", choices=_REL),
    ParamSpec("image_qos_depth", "int", 1, "QoS depth of ~/image (1 = always the latest frame)", 1, 1000),
    ParamSpec("state_qos_reliability", "str", "best_effort", "QoS reliability of ~/joint_states",
              choices=_REL),
    ParamSpec("command_qos_reliability", "str", "reliable", "QoS reliability of commands", choices=_REL),
    ParamSpec("command_qos_depth", "int", 10, "QoS depth of command topics", 1, 1000),
    ParamSpec("diagnostics_period_s", "float", 1.0, "period of /diagnostics", 0.05, 60.0),
    ParamSpec("publish_debug", "bool", False, "publish ~/debug/action_chunk (Float32MultiArray)"),
)

SIM_BRIDGE_SPECS: tuple[ParamSpec, ...] = (
    ParamSpec("tasks", "str_list", ["reach-v3"], "Meta-World MT10 tasks to run, in order"),
    ParamSpec("episodes_per_task", "int", 1, "episodes per task", 1, 100000),
    ParamSpec("seed_start", "int", 100000, "first layout seed (evaluation seeds start at 100000)",
              0, 2**31 - 1),
    ParamSpec("max_steps", "int", 200, "step cap per episode", 1, 100000),
    ParamSpec("image_size", "int", 128, "rendered camera size (square, pixels)", 8, 1024),
    ParamSpec("control_mode", "str", "lockstep",
              "lockstep: publish obs, wait for the command stamped with it, step", choices=("lockstep",)),
    ParamSpec("command_type", "str", "joint_state", "message type of the policy command",
              choices=("joint_state", "joint_trajectory")),
    ParamSpec("action_names", "str_list", list(ACTION_NAMES),
              "command joint names mapped, in order, to the env action [dx, dy, dz, gripper]"),
    ParamSpec("command_timeout_s", "float", 2.0, "wait per step before counting a missed step",
              0.001, 3600.0),
    ParamSpec("missed_step_action", "str", "hold", "action applied on a missed step",
              choices=("hold", "zero")),
    ParamSpec("startup_timeout_s", "float", 60.0,
              "wait for the policy node's topics (and model load) before the first episode",
              0.1, 3600.0),
    ParamSpec("min_result_subscribers", "int", 0,
              "before the first episode, also wait for this many ~/episode_result subscribers", 0, 1000),
    ParamSpec("frame_id", "str", "world", "frame_id of published images and states"),
    ParamSpec("results_path", "str", "", "also write episode results as JSON lines to this file"),
)

NODE_SPECS: dict[str, tuple[ParamSpec, ...]] = {
    "policy_node": POLICY_NODE_SPECS,
    "sim_bridge": SIM_BRIDGE_SPECS,
}


@dataclass(frozen=True)
class PolicyNodeParams:
    """Validated ``policy_node`` parameters (field names = parameter names)."""

    autostart: bool
    artifact_dir: str
    providers: tuple[str, ...]
    intra_op_threads: int
    seed: int
    control_rate_hz: float
    trigger: str
    require_new_inputs: bool
    chunk_mode: str
    execute_steps: int
    ensemble_decay: float
    image_encoding: str
    image_width: int
    image_height: int
    proprio_joint_names: tuple[str, ...]
    stale_input_timeout_s: float
    fault_action: str
    default_instruction: str
    max_instruction_bytes: int
    encode_unknown_instructions: bool
    output_mode: str
    joint_msg_type: str
    ee_msg_type: str
    joint_names: tuple[str, ...] | None
    frame_id: str
    gripper_index: int
    action_scale: tuple[float, ...]
    action_offset: tuple[float, ...]
    action_min: tuple[float, ...]
    action_max: tuple[float, ...]
    max_delta: tuple[float, ...]
    image_qos_reliability: str
    image_qos_depth: int
    state_qos_reliability: str
    command_qos_reliability: str
    command_qos_depth: int
    diagnostics_period_s: float
    publish_debug: bool


@dataclass(frozen=True)
class SimBridgeParams:
    """Validated ``sim_bridge`` parameters (field names = parameter names)."""

    tasks: tuple[str, ...]
    episodes_per_task: int
    seed_start: int
    max_steps: int
    image_size: int
    control_mode: str
    command_type: str
    action_names: tuple[str, ...]
    command_timeout_s: float
    missed_step_action: str
    startup_timeout_s: float
    min_result_subscribers: int
    frame_id: str
    results_path: str


def check_value(spec: ParamSpec, value: Any) -> Any:
    """Type/range/choice check of one value; returns it normalized (lists -> tuples).

    Raises:
        ParamError: naming ``spec.name``.
    """
    name, kind = spec.name, spec.kind
    if type(value).__name__ == "InvalidOverride":  # refused by rclpy at declaration (ros_io)
        raise ParamError(name, f"override rejected: {value}")
    if value is None:
        if spec.default is None:
            return None
        raise ParamError(name, "must be set")
    if kind == "bool":
        if not isinstance(value, bool):
            raise ParamError(name, f"expected true/false, got {value!r}")
        return value
    if kind in ("int", "float"):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ParamError(name, f"expected a number, got {value!r}")
        if kind == "int" and not float(value).is_integer():
            raise ParamError(name, f"expected an integer, got {value!r}")
        value = int(value) if kind == "int" else float(value)
        _check_range(spec, value, name)
        return value
    if kind == "str":
        if not isinstance(value, str):
            raise ParamError(name, f"expected a string, got {value!r}")
        if spec.choices and value not in spec.choices:
            raise ParamError(name, f"{value!r} is not one of {list(spec.choices)}")
        return value
    if not isinstance(value, (list, tuple)):
        raise ParamError(name, f"expected a list, got {value!r}")
    if kind == "float_list":
        if not value:
            raise ParamError(name, "must have at least one value")
        out = []
        for i, v in enumerate(value):
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise ParamError(name, f"element {i} is not a number: {v!r}")
            _check_range(spec, float(v), f"{name}[{i}]")
            out.append(float(v))
        return tuple(out)
    out_s = []
    for i, v in enumerate(value):
        if not isinstance(v, str) or not v:
            raise ParamError(name, f"element {i} must be a non-empty string, got {v!r}")
        out_s.append(v)
    if len(set(out_s)) != len(out_s):
        raise ParamError(name, f"has duplicate entries: {out_s}")
    return tuple(out_s)


def _check_range(spec: ParamSpec, value: float, label: str) -> None:
    if not math.isfinite(value):
        raise ParamError(label, f"must be finite, got {value!r}")
    if spec.low is not None and value < spec.low:
        raise ParamError(label, f"{value!r} is below the minimum {spec.low}")
    if spec.high is not None and value > spec.high:
        raise ParamError(label, f"{value!r} is above the maximum {spec.high}")


def _validate(specs: tuple[ParamSpec, ...], values: Mapping[str, Any]) -> dict[str, Any]:
    known = {s.name for s in specs}
    unknown = sorted(set(values) - known - BUILTIN_PARAMS)
    if unknown:
        raise ParamError(unknown[0], f"unknown parameter (unknown: {', '.join(unknown)}); "
                                     f"valid: {', '.join(sorted(known))}")
    return {s.name: check_value(s, values.get(s.name, s.default)) for s in specs}


def validate_policy_params(values: Mapping[str, Any]) -> PolicyNodeParams:
    """Validate ``policy_node`` parameter values (missing ones take defaults).

    Raises:
        ParamError: unknown parameter, wrong type, out of range, bad choice or inconsistent
            combination; the message names the parameter.
    """
    v = _validate(POLICY_NODE_SPECS, values)
    if not v["artifact_dir"].strip():
        raise ParamError("artifact_dir", "is empty; set it to an exported artifact directory")
    if not v["providers"]:
        raise ParamError("providers", "must name at least one execution provider")
    if not v["proprio_joint_names"]:
        raise ParamError("proprio_joint_names", "must name at least one joint")
    if v["joint_names"] is not None and not v["joint_names"]:
        raise ParamError("joint_names", "must not be empty (leave it unset to use the manifest names)")
    for name in ("action_min", "action_max"):
        other = "action_max" if name == "action_min" else "action_min"
        if len(v[name]) not in (1, len(v[other])) and len(v[other]) != 1:
            raise ParamError(name, f"has {len(v[name])} values but {other} has {len(v[other])}")
    lo, hi = v["action_min"], v["action_max"]
    n = max(len(lo), len(hi))
    for i in range(n):
        a, b = lo[i if len(lo) > 1 else 0], hi[i if len(hi) > 1 else 0]
        if a > b:
            raise ParamError("action_min", f"element {i} ({a}) is greater than action_max ({b})")
    return PolicyNodeParams(**v)


def validate_sim_params(values: Mapping[str, Any]) -> SimBridgeParams:
    """Validate ``sim_bridge`` parameter values; tasks are checked against MT10 by the node."""
    v = _validate(SIM_BRIDGE_SPECS, values)
    if not v["tasks"]:
        raise ParamError("tasks", "must name at least one Meta-World task")
    if len(v["action_names"]) != 4:
        raise ParamError("action_names",
                         f"must have 4 names (dx, dy, dz, gripper), got {len(v['action_names'])}")
    return SimBridgeParams(**v)


def per_dof(params: PolicyNodeParams, name: str, action_dim: int) -> tuple[float, ...]:
    """Expand per-DoF list parameter ``name`` to ``action_dim`` values (1 value broadcasts)."""
    values = getattr(params, name)
    if len(values) == 1:
        return tuple(values) * action_dim
    if len(values) != action_dim:
        raise ParamError(name, f"has {len(values)} values; the model has {action_dim} action "
                               f"dimensions (give 1 or {action_dim} values)")
    return tuple(values)


def spec_defaults(specs: tuple[ParamSpec, ...]) -> dict[str, Any]:
    """``{name: default}`` of every spec that has a default."""
    return {s.name: s.default for s in specs if s.default is not None}


def _flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in data.items():
        full = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(_flatten(value, f"{full}."))
        else:
            out[full] = value
    return out


def read_params_file(path: str | Path) -> dict[str, dict[str, Any]]:
    """Read a ROS 2 params file and check every node section against the spec tables.

    Node keys may be ``NAME``, ``/NAME``, ``/**/NAME`` or ``/NS/NAME`` for NAME in
    :data:`NODE_SPECS`, or the wildcard ``/**`` (only built-in parameters such as
    ``use_sim_time`` are allowed there). Values are type/range checked; cross-field rules that
    need the whole set (e.g. ``artifact_dir`` being set) are left to the nodes.

    Returns:
        ``{node_key: {param: value}}`` as written in the file (nested keys flattened with dots).

    Raises:
        ParamError: unknown parameter, bad value, or a section without ``ros__parameters``.
        FileNotFoundError: ``path`` does not exist.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"params file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ParamError(str(path), f"not valid YAML: {err}") from err
    if not isinstance(data, dict):
        raise ParamError(str(path), "top level must be a mapping of node names")
    sections: dict[str, dict[str, Any]] = {}
    for node_key, body in data.items():
        if not isinstance(body, dict) or "ros__parameters" not in body:
            raise ParamError(str(node_key), f"section in {path} has no 'ros__parameters' mapping")
        values = _flatten(body["ros__parameters"] or {})
        node = str(node_key).rstrip("/").rsplit("/", 1)[-1]
        if node in ("**", "*"):
            extra = sorted(set(values) - BUILTIN_PARAMS)
            if extra:
                raise ParamError(extra[0], f"is not a built-in parameter; move it from '{node_key}' "
                                           "to a node section")
        elif node in NODE_SPECS:
            specs = {s.name: s for s in NODE_SPECS[node]}
            unknown = sorted(set(values) - set(specs) - BUILTIN_PARAMS)
            if unknown:
                raise ParamError(unknown[0], f"unknown parameter of {node} in {path} "
                                             f"(unknown: {', '.join(unknown)})")
            for key, value in values.items():
                if key in specs:
                    check_value(specs[key], value)
        else:
            raise ParamError(str(node_key), f"unknown node section in {path}; expected one of "
                                            f"{sorted(NODE_SPECS)} or /**")
        sections[str(node_key)] = values
    return sections


def field_names(cls: type) -> list[str]:
    """Field names of a params dataclass (used by tests to check specs ↔ dataclass)."""
    return [f.name for f in fields(cls)]
