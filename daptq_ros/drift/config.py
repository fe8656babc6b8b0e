"""Drift-check configuration (``config/drift.yaml``, top-level key ``drift``).

Loaded with :func:`daptq_ros.config_util.load_config`; unknown keys, wrong types and bad values
raise :class:`~daptq_ros.config_util.ConfigError` naming the key.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from daptq_ros.config_util import load_config
from daptq_ros.drift.bag_io import BagTopics
from daptq_ros.runtime.chunking import ChunkingConfig

CONFIG_VERSION = 1
KINEMATIC_MODELS = ("ee_delta", "matrix", "virtual_chain")


def _non_negative(name: str, value: float | None) -> None:
    if value is not None and value < 0:
        raise ValueError(f"{name} must be >= 0 or null, got {value}")


@dataclass
class DofThreshold:
    """Largest accepted |candidate - reference| of one action DoF (raw action units); null = not gated.

    Args:
        mean: mean absolute error of the executed action.
        p95: 95th percentile.
        max: maximum.
    """

    mean: float | None = None
    p95: float | None = None
    max: float | None = None

    def __post_init__(self) -> None:
        for name in ("mean", "p95", "max"):
            _non_negative(name, getattr(self, name))


@dataclass
class Thresholds:
    """The pass/fail gate.

    Args:
        default: per-DoF limits for DoFs not listed in ``per_dof``.
        per_dof: limits by action name (e.g. ``gripper``), overriding ``default``.
        drift_m: largest accepted cumulative end-effector drift |E_t| of any episode, metres.
        time_to_threshold_m: drift level whose first crossing time is reported (time-to-threshold).
        min_time_to_threshold_s: fail when any episode crosses ``time_to_threshold_m`` sooner than
            this many seconds after its start; null = reported, not gated.
    """

    default: DofThreshold = field(default_factory=lambda: DofThreshold(mean=0.05, p95=0.15, max=0.5))
    per_dof: dict[str, DofThreshold] = field(default_factory=dict)
    drift_m: float | None = 0.02
    time_to_threshold_m: float = 0.01
    min_time_to_threshold_s: float | None = None

    def __post_init__(self) -> None:
        _non_negative("drift_m", self.drift_m)
        _non_negative("min_time_to_threshold_s", self.min_time_to_threshold_s)
        if self.time_to_threshold_m <= 0:
            raise ValueError(f"time_to_threshold_m must be > 0, got {self.time_to_threshold_m}")

    def for_dof(self, name: str) -> DofThreshold:
        """Limits of the DoF called ``name``."""
        return self.per_dof.get(name, self.default)


@dataclass
class KinematicsConfig:
    """How action errors become end-effector displacement: δe_t = action_scale · J_t · ε_t.

    Args:
        model: ``ee_delta`` (J selects ``translation_dims``: commanded Cartesian deltas),
            ``matrix`` (a constant 3×A ``jacobian``, for joint-space robots linearized at a
            working pose) or ``virtual_chain`` (DA-PTQ's virtual planar chain over all action
            dims, evaluated at the reference action; rows x, y; unit links).
        translation_dims: action indices of dx, dy, dz for ``ee_delta``.
        action_scale: metres per action unit. Meta-World's mocap moves the hand by
            ``action[:3] / 100`` m per step, hence the default 0.01.
        jacobian: 3×A matrix for ``matrix`` (metres per action unit before ``action_scale``).
    """

    model: str = "ee_delta"
    translation_dims: list[int] = field(default_factory=lambda: [0, 1, 2])
    action_scale: float = 0.01
    jacobian: list[list[float]] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.model not in KINEMATIC_MODELS:
            raise ValueError(f"model must be one of {KINEMATIC_MODELS}, got {self.model!r}")
        if self.action_scale <= 0:
            raise ValueError(f"action_scale must be > 0, got {self.action_scale}")
        if self.model == "ee_delta" and not 1 <= len(self.translation_dims) <= 3:
            raise ValueError(f"translation_dims must list 1 to 3 action indices, got {self.translation_dims}")
        if any(d < 0 for d in self.translation_dims):
            raise ValueError(f"translation_dims must be >= 0, got {self.translation_dims}")
        if self.model == "matrix":
            widths = {len(row) for row in self.jacobian}
            if len(self.jacobian) != 3 or len(widths) != 1 or 0 in widths:
                raise ValueError(
                    "jacobian must be a 3 x A matrix (3 rows of equal, non-zero length) "
                    f"for model 'matrix', got {self.jacobian}"
                )


@dataclass
class ReplayConfig:
    """Open-loop replay settings.

    Args:
        seed: base seed of the per-frame flow-head noise (identical for both artifacts).
        chunking: how chunks become executed actions (as on the robot; default 4 of 8, re-plan).
        max_frames: stop after this many frames (null = whole bag).
        every_frame: predict a chunk at every frame, not only where the robot re-plans (denser
            chunk/horizon statistics; ``execute_steps`` times slower in ``execute`` mode).
    """

    seed: int = 0
    chunking: ChunkingConfig = field(default_factory=ChunkingConfig)
    max_frames: int | None = None
    every_frame: bool = False

    def __post_init__(self) -> None:
        if self.max_frames is not None and self.max_frames < 1:
            raise ValueError(f"max_frames must be >= 1 or null, got {self.max_frames}")


@dataclass
class DriftConfig:
    """Everything `daptq drift-check` needs besides the bag and the two artifacts."""

    version: int = CONFIG_VERSION
    topics: BagTopics = field(default_factory=BagTopics)
    thresholds: Thresholds = field(default_factory=Thresholds)
    kinematics: KinematicsConfig = field(default_factory=KinematicsConfig)
    replay: ReplayConfig = field(default_factory=ReplayConfig)

    def __post_init__(self) -> None:
        if self.version != CONFIG_VERSION:
            raise ValueError(f"version must be {CONFIG_VERSION}, got {self.version}")


def default_config_path() -> Path | None:
    """The shipped ``config/drift.yaml``: repository checkout first, then the ament share directory."""
    repo = Path(__file__).resolve().parents[2] / "config" / "drift.yaml"
    if repo.is_file():
        return repo
    try:
        from ament_index_python.packages import get_package_share_directory

        share = Path(get_package_share_directory("daptq_ros")) / "config" / "drift.yaml"
    except Exception:  # ament_index missing or the package is not colcon-installed
        return None
    return share if share.is_file() else None


def load_drift_config(source: str | Path | dict[str, Any] | None) -> DriftConfig:
    """Load a :class:`DriftConfig` from YAML (key ``drift``), a dict (same layout) or None (defaults)."""
    return load_config(DriftConfig, source, section="drift" if source is not None else None)
