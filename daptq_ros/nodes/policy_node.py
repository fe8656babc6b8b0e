"""``policy_node``: runs an exported DA-PTQ artifact with ONNX Runtime and publishes commands.

A lifecycle node (``on_configure`` validates parameters and loads the model, ``on_activate``
starts the control timer); with ``autostart: true`` (default) it configures and activates
itself so ``ros2 run daptq_ros policy_node`` just works.

Topics (relative, remap them): in ``~/image`` (sensor_msgs/Image), ``~/instruction``
(std_msgs/String), ``~/joint_states`` (sensor_msgs/JointState, read by ``proprio_joint_names``);
out ``~/joint_command`` (JointState or JointTrajectory) or ``~/ee_command`` (TwistStamped or
PoseStamped, plus ``~/gripper_command`` std_msgs/Float64), optional ``~/debug/action_chunk``
(Float32MultiArray), and ``/diagnostics`` at ``diagnostics_period_s``.

Every received message is decoded defensively (raw subscriptions): malformed bytes, wrong
encodings or sizes, invalid UTF-8 and oversized instructions are counted and logged, never
crash the node, and never lead to a command.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import rclpy
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus
from rclpy.executors import ExternalShutdownException
from rclpy.lifecycle import LifecycleNode, LifecycleState, TransitionCallbackReturn
from sensor_msgs.msg import Image, JointState
from std_msgs.msg import Float32MultiArray, Float64, Header, MultiArrayDimension, String

from daptq_ros.nodes import ros_io
from daptq_ros.nodes.controller import Counters, LatencyWindow, PolicyController, SafetyFilter
from daptq_ros.nodes.params import (
    POLICY_NODE_SPECS,
    ParamError,
    PolicyNodeParams,
    per_dof,
    validate_policy_params,
)
from daptq_ros.policy_api import Observation
from daptq_ros.runtime.chunking import ChunkingConfig

NODE_NAME = "policy_node"
_RGB_ENCODINGS = ("rgb8", "bgr8", "mono8", "rgba8", "bgra8")


@dataclass
class _Frame:
    rgb: np.ndarray
    stamp: Any
    received: float
    seq: int


def _mget(manifest: Any, key: str, default: Any = None) -> Any:
    if isinstance(manifest, dict):
        return manifest.get(key, default)
    return getattr(manifest, key, default)


class PolicyNode(LifecycleNode):
    """The ONNX Runtime policy node (see the module docstring for topics and behaviour)."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(NODE_NAME, **kwargs)
        self.counters = Counters()
        self.params: PolicyNodeParams | None = None
        self.controller: PolicyController | None = None
        self.policy: Any = None
        self.error = ""
        self._active = False
        self._values, self._unknown = ros_io.declare_specs(self, POLICY_NODE_SPECS)
        self._image: _Frame | None = None
        self._proprio: np.ndarray | None = None
        self._proprio_received = 0.0
        self._seq = 0
        self._last_used_seq = 0
        self._state_seq = 0
        self._last_used_state_seq = 0
        self._last_command: np.ndarray | None = None
        self._stale = False
        self._loop = LatencyWindow()
        self._rate = ros_io.RateMeter()
        self._io: list[Any] = []
        self._pubs: dict[str, Any] = {}
        self._timer = None
        self._last_diag_counts: dict[str, int] = {}
        self._encode_target: str | None = None
        self._encoder_thread: threading.Thread | None = None
        period = self._values.get("diagnostics_period_s")
        period = period if isinstance(period, float) and 0.05 <= period <= 60 else 1.0
        self._diag_pub = self.create_publisher(DiagnosticArray, "/diagnostics", 10)
        self._diag_timer = self.create_timer(period, self.publish_diagnostics)

    # ------------------------------------------------------------------ logging helpers
    def _log(self, level: str, event: str, **fields: Any) -> None:
        text = " ".join([f"event={event}", *(f"{k}={v!r}" if isinstance(v, str) else f"{k}={v}"
                                              for k, v in fields.items())])
        # one call site per severity: rclpy's logger refuses severity changes at one call site
        if level == "error":
            self.get_logger().error(text)
        elif level == "warn":
            self.get_logger().warning(text)
        else:
            self.get_logger().info(text)

    def _fail(self, message: str) -> TransitionCallbackReturn:
        self.error = message
        self._log("error", "configure_failed", reason=message)
        self.publish_diagnostics()
        return TransitionCallbackReturn.FAILURE

    @property
    def autostart(self) -> bool:
        return self._values.get("autostart") is not False

    # ------------------------------------------------------------------ lifecycle
    def on_configure(self, state: LifecycleState) -> TransitionCallbackReturn:
        self.error = ""
        if self._unknown:
            return self._fail(str(ParamError(self._unknown[0], "unknown parameter of policy_node "
                                             f"(unknown: {', '.join(self._unknown)})")))
        try:
            self.params = p = validate_policy_params(self._values)
        except ParamError as err:
            return self._fail(str(err))
        try:
            self._load_model(p)
        except ParamError as err:
            return self._fail(str(err))
        except Exception as err:  # model load failure: stay up, report, publish nothing
            return self._fail(f"model load failed: {type(err).__name__}: {err}")
        self._create_io(p)
        self._log("info", "configured", artifact=p.artifact_dir, provider=self.provider,
                  model_sha256=str(_mget(self.policy.manifest, "model_sha256", ""))[:16],
                  output_mode=p.output_mode, rate_hz=p.control_rate_hz)
        return TransitionCallbackReturn.SUCCESS

    def on_activate(self, state: LifecycleState) -> TransitionCallbackReturn:
        if self.params is None or self.controller is None:
            self._log("error", "activate_refused", reason="not configured")
            return TransitionCallbackReturn.FAILURE
        self._active = True
        # trigger=image: the timer only checks for stale input (steps run on image + state arrival)
        self._timer = self.create_timer(1.0 / self.params.control_rate_hz, self._tick)
        self._log("info", "activated", trigger=self.params.trigger)
        return super().on_activate(state)

    def on_deactivate(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._active = False
        if self._timer is not None:
            self.destroy_timer(self._timer)
            self._timer = None
        self._log("info", "deactivated")
        return super().on_deactivate(state)

    def on_cleanup(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._destroy_io()
        self.policy = self.controller = None
        self._log("info", "cleaned_up")
        return TransitionCallbackReturn.SUCCESS

    def on_shutdown(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._active = False
        if self._timer is not None:
            self.destroy_timer(self._timer)
            self._timer = None
        return TransitionCallbackReturn.SUCCESS

    # ------------------------------------------------------------------ model + I/O
    def _load_model(self, p: PolicyNodeParams) -> None:
        art = Path(p.artifact_dir).expanduser()
        if not art.is_dir():
            raise ParamError("artifact_dir", f"{art} is not a directory")
        if not (art / "manifest.json").is_file():
            raise ParamError("artifact_dir", f"{art} has no manifest.json (not an exported artifact)")
        from daptq_ros.runtime.onnx_policy import OnnxStepPolicy  # heavy import, only when needed

        chunking = ChunkingConfig(mode=p.chunk_mode, execute_steps=p.execute_steps,
                                  ensemble_decay=p.ensemble_decay)
        policy = OnnxStepPolicy(str(art), providers=list(p.providers), chunking=chunking,
                                threads=p.intra_op_threads, allow_encode=p.encode_unknown_instructions)
        manifest = policy.manifest
        action_names = list(_mget(manifest, "action_names", []) or [])
        dim = len(action_names) or 4
        if p.joint_names is not None and len(p.joint_names) != dim:
            raise ParamError("joint_names", f"has {len(p.joint_names)} names; the model has {dim} actions")
        if p.output_mode == "ee" and p.gripper_index >= dim:
            raise ParamError("gripper_index", f"{p.gripper_index} is outside the {dim} action dimensions")
        if p.execute_steps > int(policy.chunk_size) and p.chunk_mode == "execute":
            raise ParamError("execute_steps", f"{p.execute_steps} exceeds the model's chunk size "
                                              f"{policy.chunk_size}")
        safety = SafetyFilter(*(per_dof(p, n, dim) for n in
                                ("action_scale", "action_offset", "action_min", "action_max", "max_delta")))
        self.model_size = tuple(policy.image_size)
        self.action_names = action_names or [f"a{i}" for i in range(dim)]
        self.joint_names = list(p.joint_names) if p.joint_names else self.action_names
        self.policy = policy
        self.provider = str(getattr(policy, "provider", "unknown"))
        self.controller = PolicyController(policy, chunking, safety, seed=p.seed,
                                           default_instruction=p.default_instruction,
                                           counters=self.counters)

    def _create_io(self, p: PolicyNodeParams) -> None:
        img_qos = ros_io.qos(p.image_qos_reliability, p.image_qos_depth)
        self._io = [
            self.create_subscription(Image, "~/image", self._on_image, img_qos, raw=True),
            self.create_subscription(String, "~/instruction", self._on_instruction,
                                     ros_io.qos("reliable", 10), raw=True),
            self.create_subscription(JointState, "~/joint_states", self._on_joint_states,
                                     ros_io.qos(p.state_qos_reliability, 5), raw=True),
        ]
        cmd_qos = ros_io.qos(p.command_qos_reliability, p.command_qos_depth)
        if p.output_mode == "joint":
            from trajectory_msgs.msg import JointTrajectory

            mtype = JointState if p.joint_msg_type == "joint_state" else JointTrajectory
            self._pubs["command"] = self.create_lifecycle_publisher(mtype, "~/joint_command", cmd_qos)
        else:
            from geometry_msgs.msg import PoseStamped, TwistStamped

            mtype = TwistStamped if p.ee_msg_type == "twist" else PoseStamped
            self._pubs["command"] = self.create_lifecycle_publisher(mtype, "~/ee_command", cmd_qos)
            if p.gripper_index >= 0:
                self._pubs["gripper"] = self.create_lifecycle_publisher(Float64, "~/gripper_command",
                                                                        cmd_qos)
        if p.publish_debug:
            self._pubs["debug"] = self.create_lifecycle_publisher(
                Float32MultiArray, "~/debug/action_chunk", ros_io.qos("reliable", 5))

    def _destroy_io(self) -> None:
        for sub in self._io:
            self.destroy_subscription(sub)
        for pub in self._pubs.values():
            self.destroy_lifecycle_publisher(pub)
        self._io, self._pubs = [], {}

    # ------------------------------------------------------------------ input callbacks
    def _on_image(self, data: bytes) -> None:
        p = self.params
        msg = ros_io.safe_deserialize(data, Image)
        try:
            if msg is None:
                raise ValueError(f"malformed serialized Image ({len(data)} bytes)")
            rgb = self._convert_image(msg, p)
        except Exception as err:  # every conversion problem is the sender's: count, log, drop
            self.counters.bad_images += 1
            self._log("warn", "bad_image", reason=str(err), count=self.counters.bad_images)
            return
        if self._image is not None and self._image.seq > self._last_used_seq:
            self.counters.dropped_frames += 1
        self._seq += 1
        self._image = _Frame(rgb, msg.header.stamp, time.monotonic(), self._seq)
        if p.trigger == "image" and self._active:
            self._tick("image")

    def _convert_image(self, msg: Image, p: PolicyNodeParams) -> np.ndarray:
        """Checked conversion to uint8 RGB; the policy resizes to the model input itself."""
        from daptq_ros.runtime.image import image_msg_to_rgb

        if p.image_encoding != "any" and msg.encoding != p.image_encoding:
            raise ValueError(f"encoding {msg.encoding[:32]!r} != expected image_encoding "
                             f"{p.image_encoding!r}")
        if msg.encoding not in _RGB_ENCODINGS:
            raise ValueError(f"unsupported encoding {msg.encoding[:32]!r}; expected one of {_RGB_ENCODINGS}")
        wrong_w = p.image_width and msg.width != p.image_width
        if wrong_w or (p.image_height and msg.height != p.image_height):
            raise ValueError(f"size {msg.width}x{msg.height} != expected image_width x image_height "
                             f"{p.image_width}x{p.image_height}")
        if msg.width * msg.height > 4096 * 4096:
            raise ValueError(f"image {msg.width}x{msg.height} is larger than 4096x4096")
        return image_msg_to_rgb(msg)

    def _on_instruction(self, data: bytes) -> None:
        p = self.params
        try:
            text = ros_io.decode_cdr_string(data)
            if len(text.encode()) > p.max_instruction_bytes:
                raise ValueError(f"instruction has {len(text.encode())} bytes > max_instruction_bytes "
                                 f"{p.max_instruction_bytes}")
            text = text.strip()
            if not text:
                raise ValueError("instruction is empty")
            if any(ord(c) < 32 for c in text):
                raise ValueError("instruction contains control characters")
        except ValueError as err:
            self.counters.bad_instructions += 1
            self._log("warn", "bad_instruction", reason=str(err), count=self.counters.bad_instructions)
            return
        self._log("info", "instruction_received", text=text[:120])
        if text in self.policy.instructions or not p.encode_unknown_instructions:
            self.controller.set_instruction(text)  # unknown + no encoding: rejected at the boundary
            return
        # MiniLM encoding takes seconds (model load): never in the control loop
        self._encode_target = text
        if self._encoder_thread is None or not self._encoder_thread.is_alive():
            self._encoder_thread = threading.Thread(target=self._encode_worker, daemon=True)
            self._encoder_thread.start()

    def _encode_worker(self) -> None:
        try:  # the MiniLM encoder runs on torch: keep its thread pool from starving the control loop
            import torch

            torch.set_num_threads(max(1, self.params.intra_op_threads))
        except ImportError:
            pass
        while self._encode_target is not None:
            text, self._encode_target = self._encode_target, None
            t0 = time.monotonic()
            try:
                self.policy.instructions.lookup(text, allow_encode=True)  # cached in memory
            except Exception as err:
                self.counters.unknown_instructions += 1
                self._log("error", "instruction_rejected", text=text[:120], reason=str(err)[:300])
                continue
            self._log("info", "instruction_encoded", text=text[:120], seconds=round(time.monotonic() - t0, 2))
            if self._encode_target is None and self.controller is not None:
                self.controller.set_instruction(text)

    def _on_joint_states(self, data: bytes) -> None:
        names = self.params.proprio_joint_names
        msg = ros_io.safe_deserialize(data, JointState)
        try:
            if msg is None:
                raise ValueError(f"malformed serialized JointState ({len(data)} bytes)")
            if len(msg.position) != len(msg.name):
                raise ValueError(f"{len(msg.name)} names but {len(msg.position)} positions")
            index = {n: i for i, n in enumerate(msg.name)}
            missing = [n for n in names if n not in index]
            if missing:
                raise ValueError(f"missing joints {missing}")
            proprio = np.asarray([msg.position[index[n]] for n in names], dtype=np.float32)
            if not np.all(np.isfinite(proprio)):
                raise ValueError("non-finite joint positions")
        except ValueError as err:
            self.counters.bad_states += 1
            self._log("warn", "bad_joint_states", reason=str(err), count=self.counters.bad_states)
            return
        self._proprio, self._proprio_received = proprio, time.monotonic()
        self._state_seq += 1
        if self.params.trigger == "image" and self._active:
            self._tick("state")  # the image of this step may have been handled first

    # ------------------------------------------------------------------ control step
    def _tick(self, source: str = "timer") -> None:
        if not self._active or self.controller is None:
            return
        try:
            self._control_step(source)
        except Exception as err:  # never let one bad step take the node (and the robot) down
            self.counters.inference_errors += 1
            self._log("error", "control_step_failed", reason=f"{type(err).__name__}: {err}")

    def _control_step(self, source: str) -> None:
        """One control step. Acts on a *pair* of inputs: a new image and new joint_states since the
        last step (trigger=image always, trigger=timer with require_new_inputs); in image mode the
        timer only watches for stale input."""
        p = self.params
        t0 = time.monotonic()
        frame = self._image
        stale_img = frame is None or t0 - frame.received > p.stale_input_timeout_s
        stale_state = self._proprio is None or t0 - self._proprio_received > p.stale_input_timeout_s
        if stale_img or stale_state:
            if not self._stale and (frame is not None or self._proprio is not None):
                self.counters.stale_events += 1
                self._log("warn", "stale_input", image=not stale_img, joint_states=not stale_state)
            self._stale = True
            self._fault(frame.stamp if frame is not None else None)
            return
        if self._stale:
            self._log("info", "input_fresh")
            self._stale = False
        new_pair = frame.seq > self._last_used_seq and self._state_seq > self._last_used_state_seq
        if p.trigger == "image" and (source == "timer" or not new_pair):
            return
        if p.require_new_inputs and not new_pair:
            return
        self._last_used_seq, self._last_used_state_seq = frame.seq, self._state_seq
        out = self.controller.step(Observation(image=frame.rgb, proprio=self._proprio))
        if out.status == "ok":
            self._publish(out.command, frame.stamp)
            if out.chunk is not None and "debug" in self._pubs:
                self._publish_chunk(out.chunk)
        elif out.status == "no_instruction":
            # keep the inputs: act on them once an instruction lands
            self._last_used_seq, self._last_used_state_seq = frame.seq - 1, self._state_seq - 1
        elif out.status in ("nonfinite", "error"):
            self._log("error", "inference_fault", status=out.status, reason=out.detail)
            self._fault(frame.stamp)
        elapsed = time.monotonic() - t0
        self._loop.add(elapsed)
        period = 1.0 / p.control_rate_hz
        if elapsed > period:
            self.counters.overruns += int(elapsed // period)

    def _fault(self, stamp: Any) -> None:
        """Send the configured fault action (only after a first real command)."""
        action = self.params.fault_action
        if action == "none" or self._last_command is None or stamp is None:
            return
        cmd = self._last_command if action == "hold" else self.controller.safety.zero()
        self.counters.fault_commands += 1
        self._publish(cmd, stamp, fault=True)

    def _publish(self, command: np.ndarray, stamp: Any, fault: bool = False) -> None:
        p = self.params
        header = Header(stamp=stamp, frame_id=p.frame_id)
        pub = self._pubs["command"]
        if p.output_mode == "joint":
            if p.joint_msg_type == "joint_state":
                pub.publish(ros_io.joint_state_msg(header, self.joint_names, command))
            else:
                pub.publish(ros_io.joint_trajectory_msg(header, self.joint_names, command,
                                                        1.0 / p.control_rate_hz))
        else:
            gi = p.gripper_index
            cart = np.asarray([v for i, v in enumerate(command) if i != gi], dtype=np.float64)
            if p.ee_msg_type == "twist":
                pub.publish(ros_io.twist_msg(header, cart))
            else:
                pub.publish(ros_io.pose_msg(header, self._proprio[:3].astype(np.float64) + cart[:3]))
            if "gripper" in self._pubs:
                self._pubs["gripper"].publish(Float64(data=float(command[gi])))
        if not fault:
            self._last_command = np.asarray(command, dtype=np.float32)
            self.counters.commands += 1
            self._rate.tick()

    def _publish_chunk(self, chunk: np.ndarray) -> None:
        msg = Float32MultiArray()
        h, a = chunk.shape
        msg.layout.dim = [MultiArrayDimension(label="step", size=h, stride=h * a),
                          MultiArrayDimension(label="action", size=a, stride=a)]
        msg.data = chunk.astype(np.float32).ravel().tolist()
        self._pubs["debug"].publish(msg)

    # ------------------------------------------------------------------ diagnostics
    def publish_diagnostics(self) -> None:
        """Publish one DiagnosticArray with provider, model, rates, latencies and counters."""
        counts = self.counters.as_dict()
        bad_now = {k: counts[k] - self._last_diag_counts.get(k, 0) for k in
                   ("bad_images", "bad_instructions", "bad_states", "nonfinite_events",
                    "inference_errors", "unknown_instructions")}
        self._last_diag_counts = counts
        manifest = getattr(self.policy, "manifest", None)
        ctrl = self.controller
        values: dict[str, Any] = {
            "state": "active" if self._active else ("inactive" if ctrl else "unconfigured"),
            "provider": getattr(self, "provider", ""),
            "artifact_dir": self._values.get("artifact_dir", ""),
            "model_sha256": _mget(manifest, "model_sha256", "") if manifest is not None else "",
            "method": _mget(manifest, "method", "") if manifest is not None else "",
            "avg_bits": _mget(manifest, "avg_bits", "") if manifest is not None else "",
            "instruction": (ctrl.active_instruction or "") if ctrl else "",
            "target_rate_hz": self._values.get("control_rate_hz"),
            "achieved_rate_hz": self._rate.rate_hz(),
            "inference_p50_ms": ctrl.inference.percentile_ms(50) if ctrl else float("nan"),
            "inference_p99_ms": ctrl.inference.percentile_ms(99) if ctrl else float("nan"),
            "loop_p50_ms": self._loop.percentile_ms(50),
            "loop_p99_ms": self._loop.percentile_ms(99),
            "stale": self._stale,
            **counts,
        }
        if self.error:
            level, message = DiagnosticStatus.ERROR, self.error
        elif any(v > 0 for v in bad_now.values()):
            level = DiagnosticStatus.WARN
            grew = ", ".join(f"{k}+{v}" for k, v in bad_now.items() if v)
            message = f"bad input or inference faults: {grew}"
        elif self._stale:
            level, message = DiagnosticStatus.WARN, "stale input"
        elif ctrl is not None and ctrl.active_instruction is None and self._active:
            level, message = DiagnosticStatus.WARN, "waiting for an instruction"
        else:
            level, message = DiagnosticStatus.OK, values["state"]
        level = level if isinstance(level, int) else level[0]
        self._diag_pub.publish(ros_io.diagnostic_array(
            self.get_clock().now().to_msg(), f"{NODE_NAME}: {self.get_fully_qualified_name()}",
            level, message, str(values["provider"]), values))


def main(args: list[str] | None = None) -> None:
    """Console script ``policy_node``: spin the node (auto-configure/activate by default)."""
    rclpy.init(args=args)
    node = PolicyNode()
    try:
        if node.autostart:
            if node.trigger_configure() == TransitionCallbackReturn.SUCCESS:
                node.trigger_activate()
        rclpy.spin(node)
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    except Exception:
        # SIGINT shuts the context down from rclpy's signal handler; a callback already picked by
        # the executor (e.g. the diagnostics timer) then fails to publish ("publisher's context is
        # invalid"). That is a clean shutdown, not a fault; any error while the context is up is.
        if rclpy.ok():
            raise
        node.get_logger().info("shutdown interrupted a callback; exiting")
    finally:
        node.destroy_node()
        rclpy.try_shutdown()


if __name__ == "__main__":
    main()
