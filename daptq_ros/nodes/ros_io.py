"""rclpy helpers shared by the nodes: parameter declaration, QoS, safe message decoding,
command and diagnostics message construction."""

from __future__ import annotations

import struct
import time
from collections import deque
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from builtin_interfaces.msg import Duration
from builtin_interfaces.msg import Time as TimeMsg
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue
from geometry_msgs.msg import PoseStamped, TwistStamped
from rcl_interfaces.msg import FloatingPointRange, IntegerRange, ParameterDescriptor
from rclpy.exceptions import ParameterUninitializedException
from rclpy.node import Node
from rclpy.parameter import Parameter
from rclpy.qos import (
    DurabilityPolicy,
    HistoryPolicy,
    QoSProfile,
    ReliabilityPolicy,
)
from rclpy.serialization import deserialize_message
from sensor_msgs.msg import JointState
from std_msgs.msg import Header
from trajectory_msgs.msg import JointTrajectory, JointTrajectoryPoint

from daptq_ros.nodes.params import ParamSpec

_TYPES = {
    "bool": Parameter.Type.BOOL,
    "int": Parameter.Type.INTEGER,
    "float": Parameter.Type.DOUBLE,
    "str": Parameter.Type.STRING,
    "float_list": Parameter.Type.DOUBLE_ARRAY,
    "str_list": Parameter.Type.STRING_ARRAY,
}


def _descriptor(spec: ParamSpec) -> ParameterDescriptor:
    desc = spec.description
    if spec.choices:
        desc += f" (one of: {', '.join(spec.choices)})"
    d = ParameterDescriptor(name=spec.name, type=_TYPES[spec.kind].value, description=desc,
                            read_only=True)
    if spec.kind == "int" and (spec.low is not None or spec.high is not None):
        d.integer_range = [IntegerRange(from_value=int(spec.low if spec.low is not None else -2**63),
                                        to_value=int(spec.high if spec.high is not None else 2**63 - 1),
                                        step=0)]
    elif spec.kind == "float" and (spec.low is not None or spec.high is not None):
        d.floating_point_range = [FloatingPointRange(
            from_value=float(spec.low if spec.low is not None else -1e308),
            to_value=float(spec.high if spec.high is not None else 1e308), step=0.0)]
    return d


def declare_specs(node: Node, specs: Sequence[ParamSpec]) -> tuple[dict[str, Any], list[str]]:
    """Declare every spec on ``node`` (descriptor with description, type and range, read-only)
    and read the values back.

    An override that rclpy refuses (wrong type, outside the descriptor range) does not raise
    here: the parameter is declared with its default and its value is replaced by an
    :class:`InvalidOverride` carrying rclpy's message, which the validator reports by name.
    Returns ``(values, unknown)``: ``unknown`` lists parameter overrides given to this node
    (params file / ``-p``) that no spec declares.
    """
    values: dict[str, Any] = {}
    for spec in specs:
        desc = _descriptor(spec)
        default = _TYPES[spec.kind] if spec.default is None else spec.default
        try:
            node.declare_parameter(spec.name, default, desc)
        except Exception as err:  # InvalidParameterTypeException / InvalidParameterValueException
            node.declare_parameter(spec.name, default, desc, ignore_override=True)
            values[spec.name] = InvalidOverride(f"{type(err).__name__}: {err}")
            continue
        try:
            values[spec.name] = node.get_parameter(spec.name).value
        except ParameterUninitializedException:
            values[spec.name] = None
    overrides = getattr(node, "_parameter_overrides", {}) or {}
    known = {s.name for s in specs} | {"use_sim_time", "start_type_description_service"}
    unknown = sorted(k for k in overrides if k not in known)
    return values, unknown


class InvalidOverride(str):
    """Marker value of a parameter whose override rclpy refused; the text says why."""


def reliability(name: str) -> ReliabilityPolicy:
    return ReliabilityPolicy.RELIABLE if name == "reliable" else ReliabilityPolicy.BEST_EFFORT


def qos(reliability_name: str, depth: int, transient_local: bool = False) -> QoSProfile:
    """A KEEP_LAST QoS profile."""
    return QoSProfile(
        history=HistoryPolicy.KEEP_LAST,
        depth=int(depth),
        reliability=reliability(reliability_name),
        durability=DurabilityPolicy.TRANSIENT_LOCAL if transient_local else DurabilityPolicy.VOLATILE,
    )


def safe_deserialize(data: bytes, msg_type: type) -> Any | None:
    """Deserialize raw CDR bytes; None when the bytes are malformed."""
    try:
        return deserialize_message(data, msg_type)
    except Exception:
        return None


def decode_cdr_string(data: bytes) -> str:
    """Strictly decode a serialized ``std_msgs/String`` (rclpy would replace bad UTF-8 silently).

    Raises:
        ValueError: malformed CDR or invalid UTF-8.
    """
    if len(data) < 8:
        raise ValueError(f"serialized String too short ({len(data)} bytes)")
    endian = "<" if data[1] & 1 else ">"
    (length,) = struct.unpack(endian + "I", data[4:8])
    if length == 0 or 8 + length > len(data):
        raise ValueError(f"serialized String length {length} exceeds the {len(data) - 8} bytes present")
    payload = data[8:8 + length - 1]
    if data[8 + length - 1] != 0:
        raise ValueError("serialized String is not NUL-terminated")
    try:
        return payload.decode("utf-8", errors="strict")
    except UnicodeDecodeError as err:
        raise ValueError(f"instruction is not valid UTF-8 ({err.reason} at byte {err.start})") from err


def stamp_to_ns(stamp: TimeMsg) -> int:
    return int(stamp.sec) * 1_000_000_000 + int(stamp.nanosec)


def ns_to_stamp(ns: int) -> TimeMsg:
    return TimeMsg(sec=int(ns // 1_000_000_000), nanosec=int(ns % 1_000_000_000))


def joint_state_msg(header: Header, names: Sequence[str], positions: np.ndarray) -> JointState:
    return JointState(header=header, name=list(names), position=[float(v) for v in positions])


def joint_trajectory_msg(header: Header, names: Sequence[str], positions: np.ndarray,
                         dt_s: float) -> JointTrajectory:
    """One-point trajectory reaching ``positions`` after one control period."""
    nsec = max(1, round(dt_s * 1e9))
    point = JointTrajectoryPoint(positions=[float(v) for v in positions],
                                 time_from_start=Duration(sec=nsec // 1_000_000_000,
                                                          nanosec=nsec % 1_000_000_000))
    return JointTrajectory(header=header, joint_names=list(names), points=[point])


def twist_msg(header: Header, command: np.ndarray) -> TwistStamped:
    """Linear = command[0:3], angular = command[3:6] when the action has 6+ Cartesian values."""
    msg = TwistStamped(header=header)
    c = [float(v) for v in command]
    msg.twist.linear.x, msg.twist.linear.y, msg.twist.linear.z = (c + [0.0] * 3)[:3]
    if len(c) >= 6:
        msg.twist.angular.x, msg.twist.angular.y, msg.twist.angular.z = c[3:6]
    return msg


def pose_msg(header: Header, position: np.ndarray) -> PoseStamped:
    """Target hand position (orientation identity: the reference policy is position-only)."""
    msg = PoseStamped(header=header)
    msg.pose.position.x, msg.pose.position.y, msg.pose.position.z = (float(v) for v in position[:3])
    msg.pose.orientation.w = 1.0
    return msg


def diagnostic_array(now: TimeMsg, name: str, level: int, message: str, hardware_id: str,
                     values: Mapping[str, Any]) -> DiagnosticArray:
    """A one-status DiagnosticArray; ``level`` is a DiagnosticStatus level (OK/WARN/ERROR)."""
    status = DiagnosticStatus(level=bytes([level]), name=name, message=message[:500],
                              hardware_id=hardware_id)
    status.values = [KeyValue(key=str(k), value=_fmt(v)) for k, v in values.items()]
    return DiagnosticArray(header=Header(stamp=now), status=[status])


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return "nan" if value != value else f"{value:.4g}"
    return str(value)


class RateMeter:
    """Achieved event rate over a sliding window of monotonic timestamps."""

    def __init__(self, window_s: float = 5.0) -> None:
        self.window_s = window_s
        self._t: deque[float] = deque()

    def tick(self) -> None:
        now = time.monotonic()
        self._t.append(now)
        while self._t and self._t[0] < now - self.window_s:
            self._t.popleft()

    def rate_hz(self) -> float:
        cutoff = time.monotonic() - self.window_s
        recent = [t for t in self._t if t >= cutoff]
        if len(recent) < 2:
            return 0.0
        return (len(recent) - 1) / max(recent[-1] - recent[0], 1e-9)
