"""rosbag2 writing for the drift tools: a finalize-or-nothing writer and message builders.

:class:`BagWriter` writes into a hidden ``.NAME.partial-*`` directory next to the target and
renames it only after the storage is finalized: an interrupted recording never looks complete.
Message definitions come from the ROS 2 Kilted typestore and are embedded in every connection,
so ``ros2 bag`` and other standard readers open the files. :func:`write_episodes_bag` writes
episodes (e.g. scripted demos) laid out like a recording of the policy node's topics.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from daptq_ros.drift.bag_io import (
    IMAGE_TYPE,
    JOINT_STATE_TYPE,
    STORAGES,
    STRING_TYPE,
    BagError,
    BagTopics,
    typestore,
)

logger = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------- writing
def _storage_plugin(storage: str) -> Any:
    from rosbags.rosbag2 import StoragePlugin

    if storage not in STORAGES:
        raise BagError(f"unknown bag storage {storage!r}; choose one of {', '.join(STORAGES)}")
    return StoragePlugin.MCAP if storage == "mcap" else StoragePlugin.SQLITE3


class BagWriter:
    """Write a rosbag2 directory atomically (context manager).

    Messages go to a hidden sibling ``.NAME.partial-XXXX`` directory; :meth:`close` finalizes the
    storage (index, metadata.yaml) and renames it to ``path``. :meth:`abort` (or an exception in
    the ``with`` block) deletes it. ``path`` must not exist.

    Args:
        path: the bag directory to create.
        storage: ``"mcap"`` (default) or ``"sqlite3"``.
    """

    def __init__(self, path: str | Path, storage: str = "mcap") -> None:
        from rosbags.rosbag2 import Writer

        self.path = Path(path)
        if self.path.exists():
            raise BagError(f"bag output {self.path} already exists; refusing to overwrite")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        plugin = _storage_plugin(storage)
        self.storage = storage
        self._tmp_parent = Path(tempfile.mkdtemp(prefix=f".{self.path.name}.partial-", dir=self.path.parent))
        # rosbags names the storage file after the bag directory, so the final name is used inside.
        self._tmp = self._tmp_parent / self.path.name
        self._writer = Writer(self._tmp, version=9, storage_plugin=plugin)
        self._writer.open()
        self._connections: dict[str, Any] = {}
        self.counts: dict[str, int] = {}

    def add_topic(self, topic: str, msgtype: str, offered_qos: Sequence[Any] = ()) -> None:
        """Register ``topic`` with ``msgtype`` (its definition comes from the Kilted typestore).

        ``offered_qos``: the publishers' QoS (:func:`qos_profile` values), stored in the bag's
        metadata so ``ros2 bag play`` republishes with them (e.g. a latched instruction).
        """
        if topic in self._connections:
            if self._connections[topic].msgtype != msgtype:
                raise BagError(f"topic {topic} already added with type {self._connections[topic].msgtype}")
            return
        store = typestore()
        if msgtype not in store.types:
            raise BagError(
                f"unknown message type {msgtype!r} for topic {topic}: not in the ROS 2 Kilted typestore"
            )
        self._connections[topic] = self._writer.add_connection(
            topic, msgtype, typestore=store, offered_qos_profiles=list(offered_qos)
        )
        self.counts[topic] = 0

    def write_raw(self, topic: str, t_ns: int, data: bytes | memoryview) -> None:
        """Write already CDR-serialized bytes (e.g. from ``rclpy.serialization``) at log time ``t_ns``."""
        if topic not in self._connections:
            raise BagError(f"topic {topic} was not added to the bag before writing")
        self._writer.write(self._connections[topic], int(t_ns), data)
        self.counts[topic] += 1

    def write(self, topic: str, t_ns: int, msg: Any) -> None:
        """Serialize a typestore message object and write it at log time ``t_ns``."""
        conn = self._connections.get(topic)
        if conn is None:
            raise BagError(f"topic {topic} was not added to the bag before writing")
        self.write_raw(topic, t_ns, typestore().serialize_cdr(msg, conn.msgtype))

    def close(self) -> Path:
        """Finalize the bag and move it to ``path``; returns ``path``."""
        if self._writer is None:
            return self.path
        if not any(self.counts.values()):
            self.abort()
            raise BagError(f"no messages were written; bag {self.path} not created")
        writer, self._writer = self._writer, None
        try:
            writer.close()
            self._tmp.rename(self.path)
        except BaseException:
            shutil.rmtree(self._tmp_parent, ignore_errors=True)
            raise
        shutil.rmtree(self._tmp_parent, ignore_errors=True)
        logger.info("wrote bag %s (%s, %d messages)", self.path, self.storage, sum(self.counts.values()))
        return self.path

    def abort(self) -> None:
        """Discard everything written so far."""
        if self._writer is not None:
            writer, self._writer = self._writer, None
            try:
                writer.abort()
            except Exception as err:  # the temp dir is removed anyway
                logger.debug("rosbags abort failed: %s", err)
        shutil.rmtree(self._tmp_parent, ignore_errors=True)

    def __enter__(self) -> BagWriter:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def qos_profile(reliable: bool, transient_local: bool, depth: int) -> Any:
    """A rosbags ``Qos`` (offered-QoS metadata entry) with ROS defaults for the other policies."""
    from rosbags.interfaces import Qos, QosDurability, QosHistory, QosLiveliness, QosReliability, QosTime

    infinite = QosTime(sec=2147483647, nsec=4294967295)
    return Qos(
        history=QosHistory.KEEP_LAST,
        depth=int(depth),
        reliability=QosReliability.RELIABLE if reliable else QosReliability.BEST_EFFORT,
        durability=QosDurability.TRANSIENT_LOCAL if transient_local else QosDurability.VOLATILE,
        deadline=infinite,
        lifespan=infinite,
        liveliness=QosLiveliness.AUTOMATIC,
        liveliness_lease_duration=infinite,
        avoid_ros_namespace_conventions=False,
    )


# -------------------------------------------------------------------------------- message builders
def _stamp(t_ns: int) -> Any:
    Time = typestore().types["builtin_interfaces/msg/Time"]
    return Time(sec=int(t_ns // 1_000_000_000), nanosec=int(t_ns % 1_000_000_000))


def _header(t_ns: int, frame_id: str) -> Any:
    return typestore().types["std_msgs/msg/Header"](stamp=_stamp(t_ns), frame_id=frame_id)


def image_msg(t_ns: int, rgb: np.ndarray, frame_id: str = "camera", encoding: str = "rgb8") -> Any:
    """A sensor_msgs/Image from a uint8 (H, W, 3) RGB array (``encoding`` rgb8 or bgr8)."""
    rgb = np.asarray(rgb)
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise ValueError(f"image must be uint8 (H, W, 3), got {rgb.dtype} {rgb.shape}")
    if encoding not in ("rgb8", "bgr8"):
        raise ValueError(f"image_msg writes rgb8 or bgr8, got {encoding!r}")
    pixels = rgb if encoding == "rgb8" else rgb[:, :, ::-1]
    Image = typestore().types[IMAGE_TYPE]
    h, w = rgb.shape[:2]
    return Image(
        header=_header(t_ns, frame_id),
        height=h,
        width=w,
        encoding=encoding,
        is_bigendian=0,
        step=w * 3,
        data=np.ascontiguousarray(pixels).reshape(-1),
    )


def string_msg(text: str) -> Any:
    """A std_msgs/String."""
    return typestore().types[STRING_TYPE](data=str(text))


def joint_state_msg(t_ns: int, names: Sequence[str], positions: Sequence[float], frame_id: str = "") -> Any:
    """A sensor_msgs/JointState with positions only."""
    JointState = typestore().types[JOINT_STATE_TYPE]
    return JointState(
        header=_header(t_ns, frame_id),
        name=list(names),
        position=np.asarray(positions, dtype=np.float64),
        velocity=np.zeros(0, np.float64),
        effort=np.zeros(0, np.float64),
    )


def twist_stamped_msg(
    t_ns: int, linear: Sequence[float], angular: Sequence[float] = (0.0, 0.0, 0.0), frame_id: str = ""
) -> Any:
    """A geometry_msgs/TwistStamped."""
    types = typestore().types
    Vector3 = types["geometry_msgs/msg/Vector3"]
    twist = types["geometry_msgs/msg/Twist"](
        linear=Vector3(*map(float, linear)), angular=Vector3(*map(float, angular))
    )
    return types["geometry_msgs/msg/TwistStamped"](header=_header(t_ns, frame_id), twist=twist)


@dataclass
class EpisodeData:
    """One episode to write as a bag: per-step images, proprio and (optionally) actions.

    Attributes:
        image: uint8 (T, H, W, 3) RGB.
        proprio: float (T, P).
        instruction: the episode's instruction.
        action: optional float (T, A) commands, written as Float32MultiArray on the command topic.
    """

    image: np.ndarray
    proprio: np.ndarray
    instruction: str
    action: np.ndarray | None = None


def write_episodes_bag(
    path: str | Path,
    episodes: Sequence[EpisodeData],
    topics: BagTopics,
    storage: str = "mcap",
    rate_hz: float = 10.0,
    joint_names: Sequence[str] = ("hand_x", "hand_y", "hand_z", "gripper_opening"),
    start_ns: int = 1_700_000_000_000_000_000,
) -> Path:
    """Write episodes as a bag laid out like a recording of the policy node's topics.

    Per step: joint state, then image 1 ms later, then the command 5 ms after the image; the
    instruction is published once 10 ms before each episode and episodes are separated by a
    pause of ``2 * topics.episode_gap_s`` (so the reader splits them again). The first command
    topic (if any) carries the actions as std_msgs/Float32MultiArray.
    """
    if rate_hz <= 0:
        raise BagError(f"rate_hz must be > 0, got {rate_hz}")
    period = round(1e9 / rate_hz)
    gap = int(2 * topics.episode_gap_s * 1e9)
    cmd_topic = topics.commands[0] if topics.commands else None
    Float32MultiArray = typestore().types["std_msgs/msg/Float32MultiArray"]
    Layout = typestore().types["std_msgs/msg/MultiArrayLayout"]
    t = int(start_ns)
    with BagWriter(path, storage) as bag:
        bag.add_topic(topics.image, IMAGE_TYPE)
        bag.add_topic(topics.instruction, STRING_TYPE)
        bag.add_topic(topics.joint_states, JOINT_STATE_TYPE)
        if cmd_topic:
            bag.add_topic(cmd_topic, "std_msgs/msg/Float32MultiArray")
        for ep in episodes:
            n = len(ep.image)
            if len(ep.proprio) != n or (ep.action is not None and len(ep.action) != n):
                raise BagError(
                    f"episode arrays differ in length: image {n}, proprio {len(ep.proprio)}"
                    f", action {None if ep.action is None else len(ep.action)}"
                )
            names = list(joint_names)[: np.shape(ep.proprio)[1]]
            bag.write(topics.instruction, t, string_msg(ep.instruction))
            t += 10_000_000
            for k in range(n):
                bag.write(topics.joint_states, t, joint_state_msg(t, names, ep.proprio[k]))
                bag.write(topics.image, t + 1_000_000, image_msg(t + 1_000_000, ep.image[k]))
                if cmd_topic and ep.action is not None:
                    data = np.asarray(ep.action[k], dtype=np.float32)
                    bag.write(
                        cmd_topic,
                        t + 6_000_000,
                        Float32MultiArray(layout=Layout(dim=[], data_offset=0), data=data),
                    )
                t += period
            t += gap
    return Path(path)
