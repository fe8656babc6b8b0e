"""Rosbag tools: record, calibrate from a bag, and the drift check (open-loop replay, report, gate).

The public verb is :func:`check_drift`; bag IO lives in :mod:`daptq_ros.drift.bag_io`. Nothing
here imports rclpy (live recording is :mod:`daptq_ros.nodes.recorder`).
"""

from daptq_ros.drift.bag_io import BagError, BagFrames, BagTopics, Frame
from daptq_ros.drift.bag_writer import BagWriter
from daptq_ros.drift.check import check_drift
from daptq_ros.drift.config import DriftConfig, load_drift_config

__all__ = [
    "BagError",
    "BagFrames",
    "BagTopics",
    "BagWriter",
    "DriftConfig",
    "Frame",
    "check_drift",
    "load_drift_config",
]
