"""`daptq record` (= `ros2 run daptq_ros record`): record policy topics to a rosbag2 file.

Live recording needs rclpy (``daptq_ros.nodes.recorder``, imported only here at run time).
``--from-demos DIR`` instead converts scripted demo episodes (``DIR/<task>/*.npz``) into a bag
laid out like a recording (no ROS graph needed), e.g. to calibrate or drift-check from sim data.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from daptq_ros.config_util import ConfigError

logger = logging.getLogger(__name__)

HELP = "record policy topics to a rosbag2 file (MCAP or sqlite3)"
EXIT_OK, EXIT_BAD_INPUT = 0, 2


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, type=Path, help="bag directory to create")
    parser.add_argument(
        "--topics",
        nargs="+",
        default=None,
        metavar="TOPIC",
        help="topics to record (default: the image, instruction, joint-state and command "
        "topics of the drift config)",
    )
    parser.add_argument(
        "--config",
        type=Path,
        default=None,
        help="drift config YAML for the default topics (default: shipped)",
    )
    parser.add_argument(
        "--types",
        nargs="+",
        default=[],
        metavar="TOPIC=TYPE",
        help="message types of topics not yet on the graph (e.g. /cmd=sensor_msgs/msg/JointState)",
    )
    parser.add_argument("--storage", choices=("mcap", "sqlite3"), default="mcap", help="storage plugin")
    parser.add_argument(
        "--duration", type=float, default=None, help="seconds to record (default: until Ctrl-C)"
    )
    parser.add_argument("--max-messages", type=int, default=None, help="stop after N messages")
    parser.add_argument("--discovery-timeout", type=float, default=5.0, help="seconds to wait for publishers")
    parser.add_argument(
        "--from-demos",
        type=Path,
        default=None,
        metavar="DIR",
        help="convert demo episodes (DIR/<task>/*.npz) to a bag instead of recording live",
    )
    parser.add_argument("--rate", type=float, default=10.0, help="control rate of --from-demos bags (Hz)")
    parser.add_argument("--max-episodes", type=int, default=None, help="--from-demos: at most N episodes")
    parser.add_argument("--json", type=Path, default=None, help="write the recording summary JSON here")
    parser.add_argument(
        "--ros-args",
        dest="ros_args",
        nargs=argparse.REMAINDER,
        default=None,
        help="ROS arguments for the recorder node (e.g. --ros-args -p use_sim_time:=true); must come last",
    )


def _parse_types(items: list[str]) -> dict[str, str]:
    types = {}
    for item in items:
        topic, sep, msgtype = item.partition("=")
        if not sep or not topic or not msgtype:
            raise ConfigError(f"--types entry {item!r} must be TOPIC=pkg/msg/Type")
        types[topic] = msgtype
    return types


def demo_episodes(demo_dir: Path, max_episodes: int | None = None) -> list:
    """Load ``DIR/<task>/*.npz`` demo episodes (architecture: Demo episodes) as EpisodeData."""
    import numpy as np

    from daptq_ros.drift.bag_io import BagError
    from daptq_ros.drift.bag_writer import EpisodeData

    files = sorted(demo_dir.glob("*/*.npz"))
    if not files:
        raise BagError(f"no demo episodes (*/*.npz) under {demo_dir}")
    episodes = []
    for path in files[:max_episodes]:
        try:
            with np.load(path, allow_pickle=False) as z:
                episodes.append(
                    EpisodeData(
                        image=z["image"],
                        proprio=z["proprio"],
                        instruction=str(z["instruction"]),
                        action=z["action"],
                    )
                )
        except (OSError, KeyError, ValueError) as err:
            raise BagError(f"demo episode {path} is unreadable: {err}") from err
    return episodes


def run(args: argparse.Namespace) -> int:
    from daptq_ros.drift.bag_io import BagError
    from daptq_ros.drift.bag_writer import write_episodes_bag
    from daptq_ros.drift.config import default_config_path, load_drift_config

    try:
        config = load_drift_config(args.config if args.config is not None else default_config_path())
        if args.from_demos is not None:
            episodes = demo_episodes(args.from_demos, args.max_episodes)
            write_episodes_bag(args.out, episodes, config.topics, storage=args.storage, rate_hz=args.rate)
            summary = {
                "bag": str(args.out),
                "storage": args.storage,
                "episodes": len(episodes),
                "frames": int(sum(len(e.image) for e in episodes)),
            }
        else:
            from daptq_ros.nodes.recorder import RecordOptions, record

            topics = args.topics or config.topics.all_topics()
            options = RecordOptions(
                out=args.out,
                topics=topics,
                storage=args.storage,
                duration_s=args.duration,
                max_messages=args.max_messages,
                types=_parse_types(args.types),
                discovery_timeout_s=args.discovery_timeout,
            )
            summary = record(options, ros_args=args.ros_args)
    except (BagError, ConfigError) as err:
        logger.error("%s", err)
        return EXIT_BAD_INPUT
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary))
    return EXIT_OK
