"""``record``: write live ROS 2 topics to a rosbag2 file (MCAP or sqlite3) without rosbag2_py.

Subscriptions are raw (``raw=True``): the CDR bytes rclpy receives are written unchanged through
``rosbags`` (they are interchangeable with rosbags' own serialization), stamped with the node
clock at reception like ``ros2 bag record``. Message definitions come from the ROS 2 Kilted
typestore, so standard readers open the bag.

Types are discovered from the graph (or given per topic). QoS follows the publishers: reliable
only when every publisher is reliable, transient-local when every publisher is (so a latched
instruction published before the recording started is still captured).

The bag is written into a hidden temporary directory and renamed on a clean finish (duration
reached, message limit reached, SIGINT/SIGTERM); a crash leaves no directory that looks like a
finished bag.
"""

from __future__ import annotations

import importlib
import logging
import signal
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import rclpy
from rclpy.context import Context
from rclpy.executors import ExternalShutdownException, SingleThreadedExecutor
from rclpy.node import Node
from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy
from rclpy.signals import SignalHandlerOptions

from daptq_ros.drift.bag_io import BagError, typestore
from daptq_ros.drift.bag_writer import BagWriter, qos_profile

logger = logging.getLogger(__name__)

NODE_NAME = "daptq_recorder"


class RecordError(BagError):
    """Recording cannot start or produced nothing (the message says which topic and why)."""


@dataclass
class RecordOptions:
    """What and how to record.

    Args:
        out: bag directory to create (must not exist).
        topics: fully qualified topic names.
        storage: ``mcap`` or ``sqlite3``.
        duration_s: stop after this many seconds of recording (None = until SIGINT/SIGTERM).
        max_messages: stop after this many messages in total (None = no limit).
        types: topic → message type (``pkg/msg/Type``) for topics not (yet) on the graph.
        discovery_timeout_s: how long to wait for the topics' publishers to appear.
        depth: subscription queue depth.
    """

    out: Path
    topics: list[str]
    storage: str = "mcap"
    duration_s: float | None = None
    max_messages: int | None = None
    types: dict[str, str] = field(default_factory=dict)
    discovery_timeout_s: float = 5.0
    depth: int = 100

    def __post_init__(self) -> None:
        self.out = Path(self.out)
        if not self.topics:
            raise RecordError("no topics to record")
        bad = [t for t in self.topics if not t.startswith("/")]
        if bad:
            raise RecordError(f"topics must be fully qualified (start with '/'), got {bad}")
        if self.duration_s is not None and self.duration_s <= 0:
            raise RecordError(f"duration must be > 0 seconds, got {self.duration_s}")
        if self.max_messages is not None and self.max_messages < 1:
            raise RecordError(f"max_messages must be >= 1, got {self.max_messages}")
        if self.discovery_timeout_s < 0 or self.depth < 1:
            raise RecordError(f"bad discovery_timeout_s={self.discovery_timeout_s} or depth={self.depth}")
        unknown = sorted(set(self.types) - set(self.topics))
        if unknown:
            raise RecordError(f"types given for topics that are not recorded: {unknown}")


def message_class(msgtype: str) -> Any:
    """Import the rclpy message class of ``pkg/msg/Type``."""
    parts = msgtype.split("/")
    if len(parts) != 3 or parts[1] != "msg":
        raise RecordError(f"message type {msgtype!r} is not of the form pkg/msg/Type")
    try:
        return getattr(importlib.import_module(f"{parts[0]}.msg"), parts[2])
    except (ImportError, AttributeError) as err:
        raise RecordError(f"message type {msgtype} is not importable in this environment: {err}") from err


class BagRecorder(Node):
    """Records raw messages of the given topics into a :class:`BagWriter`."""

    def __init__(self, options: RecordOptions, context: Context | None = None) -> None:
        super().__init__(NODE_NAME, context=context)
        self.options = options
        self.counts: dict[str, int] = {t: 0 for t in options.topics}
        self.total = 0
        self._writer: BagWriter | None = None
        self._subs: list[Any] = []

    def discover(self) -> dict[str, str]:
        """Topic → type for every requested topic, waiting up to the discovery timeout."""
        types = dict(self.options.types)
        deadline = time.monotonic() + self.options.discovery_timeout_s
        while True:
            for name, graph_types in self.get_topic_names_and_types():
                if name in self.options.topics and name not in types and graph_types:
                    if len(graph_types) > 1:
                        raise RecordError(f"topic {name} has several types on the graph: {graph_types}")
                    types[name] = graph_types[0]
            missing = [t for t in self.options.topics if t not in types]
            if not missing or time.monotonic() >= deadline:
                break
            time.sleep(0.05)
        if missing:
            raise RecordError(
                f"topic(s) {missing} not seen on the graph within {self.options.discovery_timeout_s} s; "
                "check the names or pass their types (--types TOPIC=pkg/msg/Type) to record them anyway"
            )
        store = typestore()
        for topic, msgtype in types.items():
            if msgtype not in store.types:
                raise RecordError(
                    f"topic {topic} has type {msgtype}, which the bag typestore (ROS 2 Kilted) does "
                    "not define; its message definition cannot be embedded"
                )
        return types

    def _qos(self, topic: str) -> QoSProfile:
        pubs = self.get_publishers_info_by_topic(topic)
        reliable = bool(pubs) and all(p.qos_profile.reliability == ReliabilityPolicy.RELIABLE for p in pubs)
        latched = bool(pubs) and all(
            p.qos_profile.durability == DurabilityPolicy.TRANSIENT_LOCAL for p in pubs
        )
        return QoSProfile(
            history=HistoryPolicy.KEEP_LAST,
            depth=self.options.depth,
            reliability=ReliabilityPolicy.RELIABLE if reliable else ReliabilityPolicy.BEST_EFFORT,
            durability=DurabilityPolicy.TRANSIENT_LOCAL if latched else DurabilityPolicy.VOLATILE,
        )

    def start(self, writer: BagWriter, types: Mapping[str, str]) -> None:
        """Add the connections and subscribe (raw) to every topic."""
        self._writer = writer
        for topic in self.options.topics:
            offered = [
                qos_profile(
                    p.qos_profile.reliability == ReliabilityPolicy.RELIABLE,
                    p.qos_profile.durability == DurabilityPolicy.TRANSIENT_LOCAL,
                    p.qos_profile.depth,
                )
                for p in self.get_publishers_info_by_topic(topic)
            ]
            writer.add_topic(topic, types[topic], offered)
            qos = self._qos(topic)
            cls = message_class(types[topic])
            self._subs.append(
                self.create_subscription(
                    cls, topic, lambda data, info, t=topic: self._on_message(t, data, info), qos, raw=True
                )
            )
            logger.info(
                "recording %s [%s] (%s, %s)", topic, types[topic], qos.reliability.name, qos.durability.name
            )

    def _on_message(self, topic: str, data: bytes, info: Mapping[str, Any]) -> None:
        if self._writer is None or self.done:
            return
        self._writer.write_raw(topic, self._stamp(info), data)
        self.counts[topic] += 1
        self.total += 1

    def _stamp(self, info: Mapping[str, Any]) -> int:
        """Bag timestamp: the middleware's receive time (as rosbag2 records), not the callback time.

        The executor may run the callbacks of two topics in either order, so stamping at callback time
        could put a command before the image it answers. Under simulated time the node clock is used.
        """
        received = int(info.get("received_timestamp") or 0)
        if received > 0 and not self.get_clock().ros_time_is_active:
            return received
        return self.get_clock().now().nanoseconds

    @property
    def done(self) -> bool:
        return self.options.max_messages is not None and self.total >= self.options.max_messages


def record(options: RecordOptions, ros_args: Sequence[str] | None = None) -> dict[str, Any]:
    """Record until the duration / message limit / SIGINT / SIGTERM; returns a summary dict.

    Raises:
        RecordError: bad options, topics not discoverable, unknown types, or nothing received (in
            which case no bag is created).
    """
    if options.out.exists():
        raise RecordError(f"bag output {options.out} already exists; refusing to overwrite")
    context = Context()
    # Our own SIGINT/SIGTERM handlers (rclpy's would tear the context down under us): they only set
    # a flag, and the spin loop below finalizes the bag.
    rclpy.init(
        args=["--ros-args", *ros_args] if ros_args else None,
        context=context,
        signal_handler_options=SignalHandlerOptions.NO,
    )
    stop = threading.Event()
    previous = _install_stop_handlers(stop)
    node = BagRecorder(options, context=context)
    executor = SingleThreadedExecutor(context=context)
    executor.add_node(node)
    writer: BagWriter | None = None
    start = time.monotonic()
    try:
        types = node.discover()
        writer = BagWriter(options.out, options.storage)
        node.start(writer, types)
        start = time.monotonic()
        interrupted = False
        try:
            while context.ok() and not node.done and not stop.is_set():
                if options.duration_s is not None and time.monotonic() - start >= options.duration_s:
                    break
                executor.spin_once(timeout_sec=0.05)
        except (KeyboardInterrupt, ExternalShutdownException):
            interrupted = True
        interrupted = interrupted or stop.is_set() or not context.ok()
        if interrupted:
            logger.info("interrupted; finalizing the bag")
        elapsed = time.monotonic() - start
        if node.total == 0:
            writer.abort()
            raise RecordError(f"no messages received on {options.topics} in {elapsed:.1f} s; no bag written")
        writer.close()
        writer = None
        summary = {
            "bag": str(options.out),
            "storage": options.storage,
            "seconds": elapsed,
            "messages": dict(node.counts),
            "types": types,
            "interrupted": interrupted,
        }
        logger.info("recorded %d messages in %.1f s to %s", node.total, elapsed, options.out)
        return summary
    finally:
        if writer is not None:
            writer.abort()
        executor.shutdown()
        node.destroy_node()
        rclpy.try_shutdown(context=context)
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _install_stop_handlers(stop: threading.Event) -> dict[int, Any]:
    """SIGINT/SIGTERM set ``stop`` (main thread only); returns the handlers to restore."""
    if threading.current_thread() is not threading.main_thread():
        return {}
    previous = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        previous[sig] = signal.signal(sig, lambda *_: stop.set())
    return previous
