"""``sim_bridge``: Meta-World MT10 as a ROS 2 robot, stepped in lockstep with the policy node.

Per episode it publishes the task's canonical instruction on ``~/instruction`` (reliable,
transient-local), then per step:

1. publishes the rendered main camera (``~/image``, sensor_msgs/Image rgb8, upright) and the
   robot state (``~/joint_states``, sensor_msgs/JointState) with the same header stamp;
2. waits for the command on ``~/command`` stamped with that image (JointState or
   JointTrajectory; joints picked by ``action_names`` → env action ``[dx, dy, dz, gripper]``);
3. steps the env with it. No matching command within ``command_timeout_s`` counts a missed step
   and applies the last (``hold``) or zero action.

Robot state mapping (JointState positions): ``hand_x``, ``hand_y``, ``hand_z`` (end-effector
position, m) and ``gripper_opening`` = Meta-World's 39-d observation [0:4].

Episodes end at success or ``max_steps``; each result (task, seed, success, steps, missed steps,
mean loop latency = image publish → command receive) is published as JSON on
``~/episode_result`` (``"type": "episode"``), followed by one ``"type": "summary"`` message, and
appended to ``results_path`` when set. The node exits when all episodes are done.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import rclpy
from rclpy.duration import Duration
from rclpy.executors import ExternalShutdownException
from rclpy.node import Node
from sensor_msgs.msg import Image, JointState
from std_msgs.msg import Header, String
from trajectory_msgs.msg import JointTrajectory

from daptq_ros.nodes import ros_io
from daptq_ros.nodes.params import SIM_BRIDGE_SPECS, ParamError, SimBridgeParams, validate_sim_params
from daptq_ros.nodes.summary import format_summary, summarize
from daptq_ros.policy_api import PROPRIO_NAMES

NODE_NAME = "sim_bridge"


class StartupTimeoutError(RuntimeError):
    """The policy node's topics did not appear within ``startup_timeout_s``."""


class SimBridge(Node):
    """Lockstep Meta-World bridge (see the module docstring).

    Raises:
        ParamError: invalid or unknown parameters (the message names the parameter).
    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(NODE_NAME, **kwargs)
        values, unknown = ros_io.declare_specs(self, SIM_BRIDGE_SPECS)
        if unknown:
            raise ParamError(unknown[0], f"unknown parameter of sim_bridge (unknown: {', '.join(unknown)})")
        self.params: SimBridgeParams = validate_sim_params(values)
        from daptq_ros.sim.tasks import check_task

        for task in self.params.tasks:
            try:
                check_task(task)
            except ValueError as err:
                raise ParamError("tasks", str(err)) from err
        latched = ros_io.qos("reliable", 100, transient_local=True)
        self._image_pub = self.create_publisher(Image, "~/image", ros_io.qos("reliable", 2))
        self._state_pub = self.create_publisher(JointState, "~/joint_states", ros_io.qos("reliable", 2))
        self._instr_pub = self.create_publisher(String, "~/instruction", latched)
        self._result_pub = self.create_publisher(String, "~/episode_result", latched)
        ctype = JointState if self.params.command_type == "joint_state" else JointTrajectory
        self._cmd_sub = self.create_subscription(ctype, "~/command", self._on_command,
                                                 ros_io.qos("reliable", 10))
        self._expected_ns: int | None = None
        self._command: np.ndarray | None = None
        self._command_t = 0.0
        self._last_stamp_ns = 0
        self.bad_commands = 0
        self.stale_commands = 0
        self.results: list[dict[str, Any]] = []

    # ------------------------------------------------------------------ commands
    def _on_command(self, msg: JointState | JointTrajectory) -> None:
        stamp = ros_io.stamp_to_ns(msg.header.stamp)
        if self._expected_ns is None or stamp != self._expected_ns:
            self.stale_commands += 1
            return
        try:
            action = self._parse_command(msg)
        except ValueError as err:
            self.bad_commands += 1
            self.get_logger().warning(f"event=bad_command reason={err}")
            return
        self._command, self._command_t = action, time.monotonic()

    def _parse_command(self, msg: JointState | JointTrajectory) -> np.ndarray:
        if isinstance(msg, JointState):
            names, values = list(msg.name), list(msg.position)
        else:
            if not msg.points:
                raise ValueError("JointTrajectory has no points")
            names, values = list(msg.joint_names), list(msg.points[0].positions)
        if len(names) != len(values):
            raise ValueError(f"{len(names)} joint names but {len(values)} values")
        index = {n: i for i, n in enumerate(names)}
        missing = [n for n in self.params.action_names if n not in index]
        if missing:
            raise ValueError(f"command lacks joints {missing} (action_names)")
        action = np.asarray([values[index[n]] for n in self.params.action_names], dtype=np.float64)
        if not np.all(np.isfinite(action)):
            raise ValueError(f"non-finite command {action.tolist()}")
        return action

    # ------------------------------------------------------------------ observations
    def _next_stamp(self) -> Any:
        now = self.get_clock().now().nanoseconds
        ns = max(now, self._last_stamp_ns + 1)  # strictly increasing: stamps identify steps
        self._last_stamp_ns = ns
        return ros_io.ns_to_stamp(ns)

    def _publish_obs(self, image: np.ndarray, proprio: np.ndarray) -> int:
        stamp = self._next_stamp()
        header = Header(stamp=stamp, frame_id=self.params.frame_id)
        h, w = image.shape[:2]
        img = Image(header=header, height=h, width=w, encoding="rgb8", is_bigendian=0, step=w * 3,
                    data=np.ascontiguousarray(image, dtype=np.uint8).tobytes())
        state = JointState(header=header, name=list(PROPRIO_NAMES),
                           position=[float(v) for v in proprio[:4]])
        self._expected_ns, self._command = ros_io.stamp_to_ns(stamp), None
        self._state_pub.publish(state)
        self._image_pub.publish(img)
        return self._expected_ns

    def _wait_command(self, timeout_s: float) -> np.ndarray | None:
        deadline = time.monotonic() + timeout_s
        while self._command is None and rclpy.ok():
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            rclpy.spin_once(self, timeout_sec=min(left, 0.05))
        return self._command

    def wait_for_policy(self) -> None:
        """Block until the policy node subscribes to our topics and publishes ``~/command`` (and
        ``min_result_subscribers`` listen to ``~/episode_result``)."""
        deadline = time.monotonic() + self.params.startup_timeout_s
        topic = self._cmd_sub.topic_name
        while rclpy.ok():
            ready = (self._image_pub.get_subscription_count() > 0
                     and self._state_pub.get_subscription_count() > 0
                     and self._instr_pub.get_subscription_count() > 0
                     and self.count_publishers(topic) > 0
                     and self._result_pub.get_subscription_count() >= self.params.min_result_subscribers)
            if ready:
                self.get_logger().info("event=policy_ready")
                return
            if time.monotonic() > deadline:
                raise StartupTimeoutError(
                    f"no policy node on {self._image_pub.topic_name} / {topic} after "
                    f"{self.params.startup_timeout_s:.0f} s (startup_timeout_s); is policy_node running, "
                    "configured (model loaded) and remapped to these topics?")
            rclpy.spin_once(self, timeout_sec=0.05)

    # ------------------------------------------------------------------ episodes
    def run_episode(self, env: Any, task: str, seed: int, episode: int) -> dict[str, Any]:
        """Run one lockstep episode; returns (and publishes) its result dict."""
        from daptq_ros.sim.tasks import canonical_instruction

        p = self.params
        instruction = canonical_instruction(task)
        obs = env.reset(seed)
        self._instr_pub.publish(String(data=instruction))
        last = np.zeros(4)
        latencies: list[float] = []
        missed = 0
        success = False
        steps = 0
        for steps in range(1, p.max_steps + 1):
            if not rclpy.ok():
                break
            t_pub = time.monotonic()
            self._publish_obs(obs.image, obs.proprio)
            cmd = self._wait_command(p.command_timeout_s)
            if cmd is None:
                missed += 1
                self.get_logger().warning(f"event=missed_step task={task} step={steps} missed={missed}")
                cmd = last if p.missed_step_action == "hold" else np.zeros(4)
            else:
                latencies.append(self._command_t - t_pub)
            last = cmd
            obs, success, _info = env.step(cmd)
            if success:
                break
        result = {
            "type": "episode", "episode": episode, "task": task, "seed": seed,
            "instruction": instruction, "success": bool(success), "steps": steps,
            "missed_steps": missed,
            "mean_loop_latency_ms": float(np.mean(latencies) * 1e3) if latencies else None,
            "p99_loop_latency_ms": float(np.percentile(latencies, 99) * 1e3) if latencies else None,
        }
        self._emit(result)
        self.get_logger().info("event=episode_done " + " ".join(f"{k}={v}" for k, v in result.items()
                                                                 if k != "instruction"))
        return result

    def _emit(self, record: dict[str, Any]) -> None:
        text = json.dumps(record)
        self._result_pub.publish(String(data=text))
        if self.params.results_path:
            path = Path(self.params.results_path)
            path.parent.mkdir(parents=True, exist_ok=True)
            with path.open("a") as fh:
                fh.write(text + "\n")
        if record.get("type") == "episode":
            self.results.append(record)

    def run_all(self) -> dict[str, Any]:
        """Run every task × episode; returns the summary record (also published)."""
        from daptq_ros.sim.env import MetaWorldEnv

        p = self.params
        self.wait_for_policy()
        episode = 0
        for task in p.tasks:
            with MetaWorldEnv(task, image_size=p.image_size) as env:
                for k in range(p.episodes_per_task):
                    if not rclpy.ok():
                        break
                    self.run_episode(env, task, p.seed_start + k, episode)
                    episode += 1
        summary = summarize(self.results)
        summary.update(stale_commands=self.stale_commands, bad_commands=self.bad_commands)
        self._emit(summary)
        # reliable delivery of the results to matched subscribers before the process exits
        if not self._result_pub.wait_for_all_acked(Duration(seconds=5)):
            self.get_logger().warning("event=results_not_acknowledged timeout_s=5")
        return summary


def main(args: list[str] | None = None) -> None:
    """Console script ``sim_bridge``: run all episodes, print the summary, exit (0 = completed)."""
    rclpy.init(args=args)
    code = 0
    node = None
    try:
        node = SimBridge()
        summary = node.run_all()
        print(format_summary(node.results, summary), flush=True)
    except ParamError as err:
        print(f"sim_bridge: invalid parameters: {err}", file=sys.stderr, flush=True)
        code = 2
    except StartupTimeoutError as err:
        print(f"sim_bridge: {err}", file=sys.stderr, flush=True)
        code = 3
    except (KeyboardInterrupt, ExternalShutdownException):
        code = 130
    except Exception:
        if rclpy.ok():  # a fault while running; otherwise SIGINT raced a publish (see policy_node)
            raise
        code = 130
    finally:
        if node is not None:
            node.destroy_node()
        rclpy.try_shutdown()
    sys.exit(code)


if __name__ == "__main__":
    main()
