"""Helpers for the ROS 2 node tests: a tiny real ONNX artifact, node processes, a DDS probe.

The probe runs in its own OS process (``python -m daptq_ros.nodes.probe``-style script written
to a temp file), so the test process itself never imports rclpy; all node-under-test traffic
goes over real DDS between real processes.
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from torch import nn

from daptq_ros.sim.tasks import canonical_instruction

REPO = Path(__file__).resolve().parent.parent
CHUNK = 8
TASK = "reach-v3"
INSTRUCTION = canonical_instruction(TASK)
NORM = {
    "proprio_mean": [0.0, 0.6, 0.2, 0.5],
    "proprio_std": [0.1, 0.1, 0.1, 0.5],
    "action_mean": [0.0, 0.0, 0.0, 0.0],
    "action_std": [1.0, 1.0, 1.0, 1.0],
}


class TinyPolicy(nn.Module):
    """Model I/O contract in miniature: pooled image + language + proprio -> (B, H, 4) chunk."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.vision = nn.Conv2d(3, 4, kernel_size=8, stride=8)
        self.lang = nn.Linear(384, 4)
        self.proprio = nn.Linear(4, 4)
        self.head = nn.Linear(12, CHUNK * 4)

    def forward(self, image, lang_tokens, lang_mask, proprio):
        v = self.vision(image).mean(dim=(2, 3))
        m = lang_mask.unsqueeze(-1)
        lang = (lang_tokens * m).sum(1) / m.sum(1).clamp(min=1.0)
        x = torch.cat([v, self.lang(lang), self.proprio(proprio)], dim=-1)
        return torch.tanh(self.head(x)).reshape(-1, CHUNK, 4)


def instruction_features(texts: list[str]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(0)
    out = {}
    for text in texts:
        mask = np.zeros(16, np.float32)
        mask[: min(16, len(text.split()))] = 1.0
        out[text] = (rng.standard_normal((16, 384)).astype(np.float32) * mask[:, None], mask)
    return out


def build_artifact(out_dir: Path) -> Path:
    """Export :class:`TinyPolicy` with the real exporter (model.onnx + manifest + instructions)."""
    from daptq_ros.export.onnx_export import export_policy

    torch.set_num_threads(1)
    model = TinyPolicy().eval()
    example = {
        "image": torch.rand(1, 3, 128, 128),
        "lang_tokens": torch.randn(1, 16, 384),
        "lang_mask": torch.ones(1, 16),
        "proprio": torch.randn(1, 4),
    }
    export_policy(model, example, out_dir, norm=NORM, instructions_cache=instruction_features([INSTRUCTION]),
                  method="fp32", prefer_dynamo=False)
    return out_dir


def ros_env() -> dict[str, str]:
    """Environment with a random DDS domain, localhost discovery and headless rendering."""
    env = dict(os.environ)
    env["ROS_DOMAIN_ID"] = str(random.randint(1, 100))
    env["ROS_AUTOMATIC_DISCOVERY_RANGE"] = "LOCALHOST"
    env.setdefault("MUJOCO_GL", "egl")
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def start_node(module: str, ros_args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    """Start ``python -m module --ros-args ...`` with output to ``log``."""
    fh = log.open("w")
    return subprocess.Popen([sys.executable, "-m", module, "--ros-args", *ros_args], env=env,
                            stdout=fh, stderr=subprocess.STDOUT, cwd=str(REPO), start_new_session=True)


def stop(proc: subprocess.Popen, timeout: float = 15.0) -> int:
    """SIGINT, then kill after ``timeout``; returns the exit code."""
    if proc.poll() is None:
        proc.send_signal(2)
        try:
            return proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
    return proc.wait()


def test_tiny_artifact_exports_and_runs(tmp_path):
    """The helper artifact is a real, loadable OnnxStepPolicy artifact."""
    from daptq_ros.policy_api import Observation
    from daptq_ros.runtime.onnx_policy import OnnxStepPolicy

    art = build_artifact(tmp_path / "art")
    policy = OnnxStepPolicy(art, providers=["cpu"], threads=1)
    policy.reset(INSTRUCTION, 0)
    chunk = policy.predict_chunk(Observation(image=np.zeros((64, 64, 3), np.uint8),
                                             proprio=np.array([0.0, 0.6, 0.2, 0.5], np.float32)))
    assert chunk.shape == (CHUNK, 4) and np.all(np.isfinite(chunk)) and np.all(np.abs(chunk) <= 1)


class Probe:
    """An rclpy node in the test process (own context and DDS domain), spun in a thread.

    Collects every message of the subscribed topics; :meth:`wait_for` blocks on a condition
    variable until a predicate over the collected messages holds (no fixed sleeps).
    """

    def __init__(self, domain_id: int) -> None:
        import threading
        from collections import defaultdict

        import rclpy
        from rclpy.executors import SingleThreadedExecutor

        self.ctx = rclpy.Context()
        rclpy.init(context=self.ctx, domain_id=domain_id)
        self.node = rclpy.create_node("test_probe", context=self.ctx)
        self.executor = SingleThreadedExecutor(context=self.ctx)
        self.executor.add_node(self.node)
        self.msgs: dict[str, list] = defaultdict(list)
        self.cond = threading.Condition()
        self._thread = threading.Thread(target=self._spin, daemon=True)
        self._thread.start()

    def _spin(self) -> None:
        from rclpy.executors import ExternalShutdownException

        try:
            self.executor.spin()
        except (ExternalShutdownException, Exception):  # context shut down by close()
            pass

    def subscribe(self, topic: str, msg_type: type, reliable: bool = True, latched: bool = False) -> None:
        from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy

        qos = QoSProfile(
            depth=100,
            reliability=ReliabilityPolicy.RELIABLE if reliable else ReliabilityPolicy.BEST_EFFORT,
            durability=DurabilityPolicy.TRANSIENT_LOCAL if latched else DurabilityPolicy.VOLATILE,
        )

        def callback(msg, topic=topic):
            with self.cond:
                self.msgs[topic].append(msg)
                self.cond.notify_all()

        self.node.create_subscription(msg_type, topic, callback, qos)

    def publisher(self, topic: str, msg_type: type):
        return self.node.create_publisher(msg_type, topic, 10)

    def wait_for(self, predicate, timeout: float) -> bool:
        import time

        deadline = time.monotonic() + timeout
        with self.cond:
            while not predicate():
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self.cond.wait(min(left, 0.1))
        return True

    def close(self) -> None:
        self.ctx.try_shutdown()
        self._thread.join(5)


def diag_values(msg) -> dict[str, str]:
    """Key/values of the first status of a DiagnosticArray."""
    return {kv.key: kv.value for kv in msg.status[0].values} if msg.status else {}


class NanWhenLeftPolicy(TinyPolicy):
    """TinyPolicy whose chunk is NaN when the normalized hand x is negative (sqrt of it)."""

    def forward(self, image, lang_tokens, lang_mask, proprio):
        return super().forward(image, lang_tokens, lang_mask, proprio) * torch.sqrt(proprio[:, :1, None])


def build_nan_artifact(out_dir: Path) -> Path:
    """A real artifact that returns NaN actions for hand_x < 0 (for the non-finite path)."""
    from daptq_ros.export.onnx_export import export_policy

    torch.set_num_threads(1)
    example = {"image": torch.rand(1, 3, 128, 128), "lang_tokens": torch.randn(1, 16, 384),
               "lang_mask": torch.ones(1, 16), "proprio": torch.rand(1, 4) + 0.1}
    export_policy(NanWhenLeftPolicy().eval(), example, out_dir, norm=NORM,
                  instructions_cache=instruction_features([INSTRUCTION]), prefer_dynamo=False)
    return out_dir
