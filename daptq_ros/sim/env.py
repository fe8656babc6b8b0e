"""Meta-World MT10 environment with CPU-friendly rendering and seed-determined layouts.

Seed convention (layouts are a pure function of ``(task, seed)``, identical across processes):

- Demonstrations use seeds ``[seed0, seed0 + N)`` per task (default ``seed0 = 0``), plus the next
  seeds when a scripted episode fails, so training data never goes beyond a few hundred.
- Evaluation uses seeds starting at :data:`EVAL_SEED_START` (100_000) by default, which
  demonstrations never use, so evaluation layouts are held out from training.

The layout (object and goal positions) is drawn by Meta-World's own sampler from the env's
``np_random`` generator, re-seeded with ``seed`` at every :meth:`MetaWorldEnv.reset`; Meta-World's
rejection loops (goal too close to the object, peg too close to the box) draw from the same
generator, so they stay deterministic too.

Rendering: shadows, MSAA and reflections are switched off before the renderer is created
(7.5 → ~60 frames/s on llvmpipe); ``corner*`` cameras are mounted upside-down in the model and are
rotated by 180° so images are upright. ``MUJOCO_GL`` defaults to ``egl`` (``osmesa`` when no
EGL library is found), set by ``daptq_ros.sim`` on import; it must be chosen before MuJoCo is
first imported (Meta-World imports it too).
"""

from __future__ import annotations

import atexit
import importlib
import importlib.util
import logging
import sys
from typing import Any

import mujoco  # MUJOCO_GL is defaulted by daptq_ros.sim/__init__.py, imported before this module
import numpy as np
from metaworld.env_dict import ALL_V3_ENVIRONMENTS

from daptq_ros.policy_api import Observation
from daptq_ros.sim.tasks import DEMO_SEED_START, EVAL_SEED_START, check_task  # noqa: F401 (re-export)

logger = logging.getLogger(__name__)
# PyOpenGL logs "No OpenGL_accelerate module loaded" at INFO on import; it is not actionable.
logging.getLogger("OpenGL.acceleratesupport").setLevel(logging.WARNING)

DEFAULT_CAMERA = "corner4"
WRIST_CAMERA = "gripperPOV"
STATE_DIM = 39
ACTION_DIM = 4


_LLVM_PRELOADED = False


def _preload_llvm_users() -> None:
    """Import ``triton`` (if installed) before the first software-GL context exists.

    Mesa's llvmpipe (EGL/OSMesa on CPU) and triton's bundled LLVM clash: importing triton after a
    GL context was created segfaults the process (measured: ``import triton`` after
    ``MetaWorldEnv(...).reset()`` → SIGSEGV; the other order works). transformers imports triton
    lazily (e.g. when a policy encodes an unseen instruction with MiniLM mid-evaluation), so it is
    imported here once, up front (~0.3 s).
    """
    global _LLVM_PRELOADED
    if _LLVM_PRELOADED:
        return
    _LLVM_PRELOADED = True
    if "triton" in sys.modules or importlib.util.find_spec("triton") is None:
        return
    try:
        importlib.import_module("triton")
    except Exception as err:  # a broken triton install must not break the simulator
        logger.debug("could not pre-import triton (%s); continuing", err)


def _camera_names(model: mujoco.MjModel) -> list[str]:
    return [mujoco.mj_id2name(model, mujoco.mjtObj.mjOBJ_CAMERA, i) for i in range(model.ncam)]


class MetaWorldEnv:
    """One Meta-World MT10 task with rendered observations.

    Use as a context manager (or call :meth:`close`) so the GL context is released before
    interpreter exit (otherwise EGL prints teardown errors).

    Args:
        task: MT10 task name, e.g. ``"reach-v3"``.
        image_size: square render size in pixels of every camera.
        camera: main camera name (``corner4`` by default).
        wrist_camera: optional second camera (e.g. ``gripperPOV``), returned as ``wrist_image``.

    Raises:
        ValueError: unknown task, unknown camera or a bad image size.
    """

    def __init__(
        self,
        task: str,
        image_size: int = 128,
        camera: str = DEFAULT_CAMERA,
        wrist_camera: str | None = None,
    ) -> None:
        self.task = check_task(task)
        if not isinstance(image_size, int) or not 8 <= image_size <= 1024:
            raise ValueError(f"image_size must be an integer in [8, 1024], got {image_size!r}")
        self.image_size = image_size
        self._renderer: mujoco.Renderer | None = None
        self._env = ALL_V3_ENVIRONMENTS[task]()
        try:
            self._configure_task()
            model = self._env.model
            cams = _camera_names(model)
            for name in (camera, wrist_camera):
                if name is not None and name not in cams:
                    raise ValueError(f"unknown camera {name!r} for {task}; available: {', '.join(cams)}")
            self.camera = camera
            self.wrist_camera = wrist_camera
            _preload_llvm_users()
            # Render settings must be changed before the renderer allocates its buffers.
            model.vis.quality.shadowsize = 0
            model.vis.quality.offsamples = 0
            self._renderer = mujoco.Renderer(model, image_size, image_size)
            self._renderer.scene.flags[mujoco.mjtRndFlag.mjRND_REFLECTION] = False
        except BaseException:
            self.close()
            raise
        self._obs: np.ndarray | None = None
        self.seed: int | None = None
        self.steps = 0

    def _configure_task(self) -> None:
        """Equivalent of ``MT1.set_task`` without pre-sampling 50 layouts: fully observable
        (goal in the state vector, which the scripted experts read) and seeded layouts."""
        env = self._env
        env._set_task_called = True
        env._set_task_inner()
        if env._partially_observable:
            env._partially_observable = False
            env.__dict__.pop("sawyer_observation_space", None)  # cached_property, depends on it
        env._freeze_rand_vec = False
        env.seeded_rand_vec = True

    # ------------------------------------------------------------------ episode API
    def reset(self, seed: int) -> Observation:
        """Start an episode whose layout is fully determined by ``seed`` (>= 0)."""
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
        self._require_open()
        self._env.seed(int(seed))
        obs, _ = self._env.reset()
        self._obs = np.asarray(obs, dtype=np.float64)
        self.seed = int(seed)
        self.steps = 0
        return self._observation()

    def step(self, action: np.ndarray) -> tuple[Observation, bool, dict[str, Any]]:
        """Apply one action ``[dx, dy, dz, gripper]`` (clipped to [-1, 1]).

        Returns:
            ``(observation, success, info)``; ``info`` is Meta-World's info dict plus
            ``"action"`` (the clipped action actually applied).

        Raises:
            RuntimeError: called before :meth:`reset`.
            ValueError: wrong action shape or non-finite values.
        """
        self._require_open()
        if self._obs is None:
            raise RuntimeError("MetaWorldEnv.step called before reset(seed)")
        act = np.asarray(action, dtype=np.float64).reshape(-1)
        if act.shape != (ACTION_DIM,):
            raise ValueError(f"action must have {ACTION_DIM} values, got shape {np.shape(action)}")
        if not np.all(np.isfinite(act)):
            raise ValueError(f"action has non-finite values: {act.tolist()}")
        act = np.clip(act, -1.0, 1.0)
        obs, _reward, _terminated, _truncated, info = self._env.step(act.astype(np.float32))
        self._obs = np.asarray(obs, dtype=np.float64)
        self.steps += 1
        info = dict(info)
        info["action"] = act.astype(np.float32)
        return self._observation(), bool(info.get("success", 0.0) > 0.5), info

    @property
    def hand_position(self) -> np.ndarray:
        """Current end-effector (hand) position in metres, float64 (3,)."""
        if self._obs is None:
            raise RuntimeError("MetaWorldEnv.hand_position read before reset(seed)")
        return self._obs[:3].copy()

    @property
    def state(self) -> np.ndarray:
        """Current full 39-d Meta-World observation, float64."""
        if self._obs is None:
            raise RuntimeError("MetaWorldEnv.state read before reset(seed)")
        return self._obs.copy()

    def render(self, camera: str | None = None) -> np.ndarray:
        """Render ``camera`` (default: the main camera) as an upright uint8 (H, W, 3) image."""
        self._require_open()
        name = camera or self.camera
        self._renderer.update_scene(self._env.data, camera=name)
        img = self._renderer.render()
        # corner* cameras are mounted upside-down: rotate by 180° (a vertical flip would mirror).
        return np.ascontiguousarray(img[::-1, ::-1]) if name.startswith("corner") else img.copy()

    def _observation(self) -> Observation:
        obs = self._obs
        wrist = self.render(self.wrist_camera) if self.wrist_camera else None
        return Observation(
            image=self.render(),
            proprio=obs[:4].astype(np.float32),
            wrist_image=wrist,
            state=obs.astype(np.float32),
        )

    # ------------------------------------------------------------------ lifetime
    def _require_open(self) -> None:
        if self._env is None or self._renderer is None:
            raise RuntimeError(f"MetaWorldEnv({self.task}) is closed")

    def close(self) -> None:
        """Release the renderer (GL context) and the MuJoCo env; safe to call twice."""
        if self._renderer is not None:
            self._renderer.close()
            self._renderer = None
        if self._env is not None:
            self._env.close()
            self._env = None

    def __enter__(self) -> MetaWorldEnv:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # interpreter teardown: modules may already be gone
            pass


class EnvCache:
    """Keeps the most recently used :class:`MetaWorldEnv` open (one per process).

    Workers that run many episodes reuse the env of a task instead of rebuilding it (~0.7 s) for
    every episode; only one env is kept so a worker never holds ten GL contexts.

    Args:
        image_size, camera, wrist_camera: passed to every :class:`MetaWorldEnv`.
        close_at_exit: close the cached env at interpreter exit (pool workers, which are never
            told when they end). Registered after the first GL context exists, so it runs before
            MuJoCo's own ``eglTerminate`` exit hook (atexit is last-in, first-out).
    """

    def __init__(
        self,
        image_size: int = 128,
        camera: str = DEFAULT_CAMERA,
        wrist_camera: str | None = None,
        close_at_exit: bool = False,
    ) -> None:
        self.image_size = image_size
        self.camera = camera
        self.wrist_camera = wrist_camera
        self._env: MetaWorldEnv | None = None
        self._close_at_exit = close_at_exit

    def get(self, task: str) -> MetaWorldEnv:
        """The env of ``task``, creating it (and closing the previous one) when needed."""
        if self._env is None or self._env.task != task:
            self.close()
            self._env = MetaWorldEnv(task, self.image_size, self.camera, self.wrist_camera)
            if self._close_at_exit:
                atexit.register(self.close)
                self._close_at_exit = False
        return self._env

    def close(self) -> None:
        """Close the cached env, if any."""
        if self._env is not None:
            self._env.close()
            self._env = None
