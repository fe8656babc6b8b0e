"""rosbag2 reading for the drift tools: topic config, validation and synchronized frames.

Bags are read with ``rosbags`` (pure Python; rosbag2 MCAP and sqlite3; writing lives in
:mod:`daptq_ros.drift.bag_writer`) through the ROS 2 Kilted typestore.

:class:`BagFrames` turns a bag into time-ordered policy frames ``(t, image_rgb, instruction,
proprio, command)``: per image message, the latest instruction received before it (or within
``max_sync_dt_s`` after it: an episode's first image may overtake its instruction), the
joint state nearest in time (within ``max_sync_dt_s``) and the first command at or after it.
All alignment uses the bag's receive (log) times, the one clock every topic shares; header stamps
are only checked for order. Every problem with the input surfaces as :class:`BagError`.
"""

from __future__ import annotations

import bisect
import dataclasses
import logging
from collections.abc import Container, Iterator, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from daptq_ros.policy_api import PROPRIO_NAMES
from daptq_ros.runtime.image import ImageConversionError, ros_image_to_rgb

logger = logging.getLogger(__name__)

STORAGES = ("mcap", "sqlite3")
IMAGE_TYPE = "sensor_msgs/msg/Image"
STRING_TYPE = "std_msgs/msg/String"
JOINT_STATE_TYPE = "sensor_msgs/msg/JointState"
# Command message types the reader can turn into a vector, and how.
COMMAND_TYPES = (
    "geometry_msgs/msg/TwistStamped",
    "geometry_msgs/msg/Twist",
    "geometry_msgs/msg/PoseStamped",
    "sensor_msgs/msg/JointState",
    "trajectory_msgs/msg/JointTrajectory",
    "std_msgs/msg/Float32MultiArray",
    "std_msgs/msg/Float64MultiArray",
)


EPISODE_ON_INSTRUCTION = ("message", "change", "never")


_EMPTY_IMAGE = np.zeros((0, 0, 3), dtype=np.uint8)


class BagError(ValueError):
    """A bag cannot be used: the message names the bag, the topic and the problem."""


@lru_cache(maxsize=1)
def typestore() -> Any:
    """The ROS 2 Kilted typestore (message classes, CDR serde, message definitions)."""
    from rosbags.typesys import Stores, get_typestore

    return get_typestore(Stores.ROS2_KILTED)


@dataclass
class BagTopics:
    """Which topics of a bag feed the policy, and how frames are synchronized and split.

    Args:
        image: main camera topic (sensor_msgs/Image).
        instruction: instruction topic (std_msgs/String); the latest one received before each image
            (or at most ``max_sync_dt_s`` after it) is used.
        joint_states: proprioception topic (sensor_msgs/JointState); the nearest one in time is used.
        commands: command topics published by the policy (optional; any of :data:`COMMAND_TYPES`).
            Their vectors are concatenated in this order.
        proprio_names: JointState names that form the proprio vector, in order; empty = the
            first ``proprio_dim`` positions.
        proprio_dim: proprio size when ``proprio_names`` is empty.
        max_sync_dt_s: largest |t_image - t_joint_state| (and command delay) accepted, seconds.
        episode_gap_s: a pause longer than this between images starts a new episode.
        episode_on_instruction: ``message``: every instruction message starts a new episode (the
            sim bridge publishes one per episode); ``change``: only a changed text does (robots
            that re-publish the instruction periodically); ``never``.
        episode_jump: a jump of the first three proprio values (hand xyz, m) larger than this
            between consecutive frames starts a new episode (a reset); None disables it.
    """

    image: str = "/camera/image"
    instruction: str = "/instruction"
    joint_states: str = "/joint_states"
    commands: list[str] = field(default_factory=lambda: ["/joint_command"])
    proprio_names: list[str] = field(default_factory=lambda: list(PROPRIO_NAMES))
    proprio_dim: int = 4
    max_sync_dt_s: float = 0.1
    episode_gap_s: float = 1.0
    episode_on_instruction: str = "message"
    episode_jump: float | None = 0.05

    def __post_init__(self) -> None:
        for name in ("image", "instruction", "joint_states"):
            if not getattr(self, name):
                raise ValueError(f"{name} topic must not be empty")
        if self.proprio_dim < 1:
            raise ValueError(f"proprio_dim must be >= 1, got {self.proprio_dim}")
        if self.max_sync_dt_s <= 0 or self.episode_gap_s <= 0:
            raise ValueError(
                f"max_sync_dt_s and episode_gap_s must be > 0, got {self.max_sync_dt_s}, {self.episode_gap_s}"
            )
        if self.episode_on_instruction not in EPISODE_ON_INSTRUCTION:
            raise ValueError(
                f"episode_on_instruction must be one of {EPISODE_ON_INSTRUCTION}, "
                f"got {self.episode_on_instruction!r}"
            )
        if self.episode_jump is not None and self.episode_jump <= 0:
            raise ValueError(f"episode_jump must be > 0 or null, got {self.episode_jump}")

    def all_topics(self) -> list[str]:
        """Every configured topic (inputs first, then commands)."""
        return [self.image, self.instruction, self.joint_states, *self.commands]


@dataclass(frozen=True)
class Frame:
    """One synchronized policy input (plus the command recorded for it, if any).

    Attributes:
        t_ns: image receive time (bag log time), ns.
        image: uint8 RGB (H, W, 3), upright.
        instruction: the instruction in force.
        proprio: float32 (P,) from the joint state.
        command: float32 vector of the recorded command topics, or None if none was recorded.
        episode: episode index (0-based) from the boundary rules of :class:`BagTopics`.
        index: frame index in the bag (0-based, after skipping unsynchronizable images).
    """

    t_ns: int
    image: np.ndarray
    instruction: str
    proprio: np.ndarray
    command: np.ndarray | None
    episode: int
    index: int


# ----------------------------------------------------------------------------------------- reading
def command_vector(msg: Any, msgtype: str) -> np.ndarray:
    """Turn a deserialized command message into a float32 vector (see :data:`COMMAND_TYPES`)."""
    if msgtype in ("geometry_msgs/msg/TwistStamped", "geometry_msgs/msg/Twist"):
        tw = msg.twist if msgtype.endswith("Stamped") else msg
        vals = [tw.linear.x, tw.linear.y, tw.linear.z, tw.angular.x, tw.angular.y, tw.angular.z]
    elif msgtype == "geometry_msgs/msg/PoseStamped":
        p, q = msg.pose.position, msg.pose.orientation
        vals = [p.x, p.y, p.z, q.x, q.y, q.z, q.w]
    elif msgtype == JOINT_STATE_TYPE:
        vals = list(msg.position)
    elif msgtype == "trajectory_msgs/msg/JointTrajectory":
        vals = list(msg.points[0].positions) if len(msg.points) else []
    elif msgtype in ("std_msgs/msg/Float32MultiArray", "std_msgs/msg/Float64MultiArray"):
        vals = list(msg.data)
    else:
        raise BagError(f"unsupported command message type {msgtype!r}; supported: {', '.join(COMMAND_TYPES)}")
    return np.asarray(vals, dtype=np.float32)


def _stamp_ns(msg: Any) -> int:
    stamp = msg.header.stamp
    return int(stamp.sec) * 1_000_000_000 + int(stamp.nanosec)


def _hint(err: BaseException) -> str:
    return f"{type(err).__name__}: {err}"


def open_reader(path: str | Path) -> Any:
    """An open ``rosbags.rosbag2.Reader``; a missing, empty, truncated or corrupt bag → BagError."""
    from rosbags.rosbag2 import Reader

    path = Path(path)
    if not path.exists():
        raise BagError(f"bag {path} does not exist")
    try:
        reader = Reader(path)
        reader.open()
    except Exception as err:
        raise BagError(
            f"bag {path} cannot be opened (empty, truncated or corrupt; an interrupted rosbag2 "
            f"recording can be repaired with `ros2 bag reindex`): {_hint(err)}"
        ) from err
    return reader


class BagFrames:
    """Validated, synchronized frames of one bag (iterate to stream them in time order).

    Opening indexes the small topics (instruction, joint states, commands) and checks the bag;
    iterating streams the images. Construction and iteration raise :class:`BagError` for a
    missing path, an unreadable/empty/truncated bag, missing topics, wrong or unknown message
    types, out-of-order header stamps, unconvertible images and bags that yield no frame.

    Args:
        path: rosbag2 directory (or a single ``.mcap`` / ``.db3`` file).
        topics: topic configuration.
    """

    def __init__(self, path: str | Path, topics: BagTopics) -> None:
        self.path = Path(path)
        self.topics = topics
        self.skipped: dict[str, int] = {"no_instruction": 0, "no_joint_state": 0}
        self.connections = self._open()
        self._index_small_topics()

    # -- opening and validation
    def _reader(self) -> Any:
        return open_reader(self.path)

    def _open(self) -> dict[str, Any]:
        reader = self._reader()
        try:
            conns: dict[str, Any] = {}
            self.counts: dict[str, int] = {}
            for c in reader.connections:  # a topic may have several connections (e.g. QoS changes)
                if c.topic in conns and conns[c.topic].msgtype != c.msgtype:
                    raise BagError(
                        f"bag {self.path}: topic {c.topic} has several types "
                        f"({conns[c.topic].msgtype}, {c.msgtype})"
                    )
                conns.setdefault(c.topic, c)
                self.counts[c.topic] = self.counts.get(c.topic, 0) + int(c.msgcount)
            if reader.message_count == 0:
                raise BagError(f"bag {self.path} contains no messages")
        finally:
            reader.close()
        available = ", ".join(f"{t} [{c.msgtype}]" for t, c in sorted(conns.items())) or "none"
        missing = [t for t in self.topics.all_topics() if t not in conns]
        if missing:
            raise BagError(f"bag {self.path} lacks topic(s) {', '.join(missing)}; it has: {available}")
        expected = {
            self.topics.image: IMAGE_TYPE,
            self.topics.instruction: STRING_TYPE,
            self.topics.joint_states: JOINT_STATE_TYPE,
        }
        for topic, want in expected.items():
            if conns[topic].msgtype != want:
                raise BagError(
                    f"bag {self.path}: topic {topic} has type {conns[topic].msgtype}, expected {want}"
                )
        store = typestore()
        for topic in self.topics.all_topics():
            msgtype = conns[topic].msgtype
            if topic in self.topics.commands and msgtype not in COMMAND_TYPES:
                raise BagError(
                    f"bag {self.path}: command topic {topic} has unsupported type {msgtype}; "
                    f"supported: {', '.join(COMMAND_TYPES)}"
                )
            if msgtype not in store.types:
                raise BagError(f"bag {self.path}: unknown message type {msgtype} on topic {topic}")
        for topic in (self.topics.image, self.topics.instruction, self.topics.joint_states):
            if self.counts[topic] == 0:
                raise BagError(f"bag {self.path}: topic {topic} has no messages")
        return conns

    def _messages(self, topics: Sequence[str]) -> Iterator[tuple[str, int, Any]]:
        """Deserialized (topic, log_time_ns, msg) in log-time order; storage errors → BagError."""
        store = typestore()
        reader = self._reader()
        try:
            it = reader.messages(connections=[c for c in reader.connections if c.topic in topics])
            while True:
                try:
                    item = next(it)
                except StopIteration:
                    return
                except Exception as err:
                    raise BagError(f"bag {self.path} is truncated or corrupt: {_hint(err)}") from err
                conn, t_ns, raw = item
                try:
                    msg = store.deserialize_cdr(raw, conn.msgtype)
                except Exception as err:
                    raise BagError(
                        f"bag {self.path}: message on {conn.topic} at t={t_ns} ns does not deserialize as "
                        f"{conn.msgtype}: {_hint(err)}"
                    ) from err
                yield conn.topic, int(t_ns), msg
        finally:
            reader.close()

    def _index_small_topics(self) -> None:
        tp = self.topics
        self._instr_t: list[int] = []
        self._instr: list[str] = []
        js_t: list[int] = []
        js: list[np.ndarray] = []
        self._cmd: dict[str, tuple[list[int], list[np.ndarray]]] = {t: ([], []) for t in tp.commands}
        last_stamp = -1
        for topic, t_ns, msg in self._messages([tp.instruction, tp.joint_states, *tp.commands]):
            if topic == tp.instruction:
                self._instr_t.append(t_ns)
                self._instr.append(str(msg.data))
            elif topic == tp.joint_states:
                stamp = _stamp_ns(msg)
                if 0 < stamp < last_stamp:
                    raise BagError(
                        f"bag {self.path}: out-of-order timestamps on {topic}: message {len(js_t)} has "
                        "header "
                        f"stamp {stamp} ns < previous {last_stamp} ns"
                    )
                last_stamp = max(last_stamp, stamp)
                js_t.append(t_ns)
                js.append(self._proprio(msg, t_ns))
            if topic in self._cmd:
                times, vals = self._cmd[topic]
                times.append(t_ns)
                vals.append(command_vector(msg, self.connections[topic].msgtype))
        self._js_t = np.asarray(js_t, dtype=np.int64)
        self._js = js

    def _proprio(self, msg: Any, t_ns: int) -> np.ndarray:
        positions = np.asarray(msg.position, dtype=np.float32)
        names = self.topics.proprio_names
        if names:
            index = {n: i for i, n in enumerate(msg.name)}
            absent = [n for n in names if n not in index]
            if absent:
                raise BagError(
                    f"bag {self.path}: joint state at t={t_ns} ns on {self.topics.joint_states} lacks "
                    f"joint(s) {absent}; it has {list(msg.name)}"
                )
            return positions[[index[n] for n in names]]
        if positions.size < self.topics.proprio_dim:
            raise BagError(
                f"bag {self.path}: joint state at t={t_ns} ns on {self.topics.joint_states} has "
                f"{positions.size} positions, need proprio_dim={self.topics.proprio_dim}"
            )
        return positions[: self.topics.proprio_dim].copy()

    # -- frames
    @property
    def n_images(self) -> int:
        """Image messages in the bag (an upper bound on the frame count)."""
        return self.counts[self.topics.image]

    @property
    def instructions(self) -> list[str]:
        """Distinct instructions in the bag, first-seen order."""
        return list(dict.fromkeys(self._instr))

    def _nearest_joint_state(self, t_ns: int) -> np.ndarray | None:
        i = int(np.searchsorted(self._js_t, t_ns))
        best = None
        for j in (i - 1, i):
            if 0 <= j < len(self._js_t):
                dt = abs(int(self._js_t[j]) - t_ns)
                if best is None or dt < best[0]:
                    best = (dt, j)
        if best is None or best[0] > self.topics.max_sync_dt_s * 1e9:
            return None
        return self._js[best[1]]

    def _command(self, t_ns: int) -> np.ndarray | None:
        parts = []
        for times, vals in self._cmd.values():
            i = bisect.bisect_left(times, t_ns)
            if i == len(times) or times[i] - t_ns > self.topics.max_sync_dt_s * 1e9:
                return None
            parts.append(vals[i])
        return np.concatenate(parts) if parts else None

    def __iter__(self) -> Iterator[Frame]:
        return self.iter_frames()

    def episode_index(self) -> np.ndarray:
        """Episode of every frame (N,), from a pass that does not convert images."""
        episodes: list[int] = []
        for _ in self.iter_frames(select=(), episodes_out=episodes):
            pass
        return np.asarray(episodes, dtype=np.int64)

    def iter_frames(
        self, select: Container[int] | None = None, episodes_out: list[int] | None = None
    ) -> Iterator[Frame]:
        """Frames in time order; with ``select`` only those frame indices (others are not converted).

        Args:
            select: frame indices to yield (None = all).
            episodes_out: when given, the episode of every frame (selected or not) is appended.
        """
        tp = self.topics
        self.skipped = {"no_instruction": 0, "no_joint_state": 0}
        episode, index, prev_k = -1, 0, -1
        prev: Frame | None = None
        last_stamp = -1
        for n, (_, t_ns, msg) in enumerate(self._messages([tp.image])):
            stamp = _stamp_ns(msg)
            if 0 < stamp < last_stamp:
                raise BagError(
                    f"bag {self.path}: out-of-order timestamps on {tp.image}: image {n} has header "
                    f"stamp {stamp} ns < previous {last_stamp} ns"
                )
            last_stamp = max(last_stamp, stamp)
            # An instruction received up to max_sync_dt_s after the image still applies to it: topics
            # are delivered independently, so an episode's first image can overtake its instruction.
            k = bisect.bisect_right(self._instr_t, t_ns + int(tp.max_sync_dt_s * 1e9)) - 1
            if k < 0:
                self.skipped["no_instruction"] += 1
                continue
            proprio = self._nearest_joint_state(t_ns)
            if proprio is None:
                self.skipped["no_joint_state"] += 1
                continue
            instruction = self._instr[k]
            new_episode = prev is None or (t_ns - prev.t_ns) > tp.episode_gap_s * 1e9
            if prev is not None and (
                (tp.episode_on_instruction == "message" and k != prev_k)
                or (tp.episode_on_instruction == "change" and instruction != prev.instruction)
            ):
                new_episode = True
            if (
                prev is not None
                and tp.episode_jump is not None
                and proprio.size >= 3
                and float(np.linalg.norm(proprio[:3] - prev.proprio[:3])) > tp.episode_jump
            ):
                new_episode = True
            episode += int(new_episode)
            if episodes_out is not None:
                episodes_out.append(episode)
            frame = Frame(t_ns, _EMPTY_IMAGE, instruction, proprio, None, episode, index)
            index += 1
            prev, prev_k = frame, k
            if select is not None and frame.index not in select:
                continue
            try:
                data = msg.data if isinstance(msg.data, np.ndarray) else bytes(msg.data)
                rgb = ros_image_to_rgb(msg.encoding, msg.height, msg.width, msg.step, data, msg.is_bigendian)
            except ImageConversionError as err:
                raise BagError(f"bag {self.path}: image {n} on {tp.image} at t={t_ns} ns: {err}") from err
            yield dataclasses.replace(frame, image=rgb, command=self._command(t_ns))
        if index == 0:
            raise BagError(
                f"bag {self.path} yields no frames: {self.n_images} images, "
                f"{self.skipped['no_instruction']} before the first instruction on {tp.instruction}, "
                f"{self.skipped['no_joint_state']} without a joint state "
                f"on {tp.joint_states} within {tp.max_sync_dt_s} s"
            )
        if any(self.skipped.values()):
            logger.warning("bag %s: skipped images %s", self.path, self.skipped)


def bag_topics_summary(path: str | Path) -> dict[str, dict[str, Any]]:
    """``{topic: {"type", "count", "msgdef_format"}}`` of a bag, for logs and reports."""
    reader = open_reader(path)
    try:
        return {
            c.topic: {"type": c.msgtype, "count": int(c.msgcount), "msgdef_format": c.msgdef.format.name}
            for c in reader.connections
        }
    finally:
        reader.close()
