"""The quantization recipe: one typed config for ``daptq quantize`` (``config/quantize.yaml``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from daptq_ros.config_util import ConfigError, load_config, read_yaml
from daptq_ros.quant.calibration import DEFAULT_CALIB_FRAMES, DEFAULT_SWEEP_FRAMES
from daptq_ros.quant.drift_loss import DriftOptions
from daptq_ros.quant.fakequant import ACT_GRANULARITIES, FLOAT_BITS, INT_WEIGHT_BITS
from daptq_ros.quant.gptq import GPTQOptions

RECIPE_VERSION = 1
ROUNDINGS = ("auto", "rtn", "gptq")
ACT_CALIBRATIONS = ("percentile", "mse", "minmax")


@dataclass
class QuantRecipe:
    """Everything that defines a quantization run.

    Args:
        version: recipe schema version.
        method: registered PTQ method (see ``daptq_ros.quant.available_methods()``).
        w_bits: uniform weight bits for uniform methods (2, 3, 4, 8; 16 = float).
        budget: average bits per weight (incl. scale overhead) for allocating methods; uniform
            methods then use the largest uniform bit-width that fits. None = use ``w_bits``.
        group_size: weight group size along the input dim (0 = per output channel; 32/64/128).
        symmetric: symmetric (zero point 0) weight grid; False = asymmetric.
        w_clip: weight range: ``minmax`` or ``mse`` (per-group shrink search).
        a_bits: activation bits: 8 (int8) or 16 (float, i.e. weight-only).
        act_granularity: ``tensor`` (static per-tensor, exportable) or ``token`` (dynamic).
        act_calibration: static scale estimator: ``percentile``, ``mse`` or ``minmax``.
        act_percentile: percentile of |x| for ``percentile`` (default 99.99).
        rounding: ``auto`` (the method's default), ``rtn`` or ``gptq``.
        gptq: GPTQ back-end settings (damp, act_order, block_size).
        skip: layer-name patterns kept float (fnmatch globs, or regex with a ``re:`` prefix).
        calib_frames: calibration frames used (default 256, see calibration.py for why).
        min_calib_frames: fewer frames than this is an error.
        sweep_frames: frames for per-layer sensitivity sweeps (subset of the calibration set).
        seed: seed for every random choice (subsets, random allocation).
        drift: the calibration drift loss (Jacobian, weights, horizon).
        method_options: per-method sub-options, ``{method_name: {key: value}}``.
    """

    version: int = RECIPE_VERSION
    method: str = "daptq"
    w_bits: int = 4
    budget: float | None = None
    group_size: int = 0
    symmetric: bool = True
    w_clip: str = "mse"
    a_bits: int = 8
    act_granularity: str = "tensor"
    act_calibration: str = "percentile"
    act_percentile: float = 99.99
    rounding: str = "auto"
    gptq: GPTQOptions = field(default_factory=GPTQOptions)
    skip: list[str] = field(default_factory=list)
    calib_frames: int = DEFAULT_CALIB_FRAMES
    min_calib_frames: int = 32
    sweep_frames: int = DEFAULT_SWEEP_FRAMES
    seed: int = 0
    drift: DriftOptions = field(default_factory=DriftOptions)
    method_options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        from daptq_ros.quant.registry import UnknownMethodError, get_method, method_options

        if self.version != RECIPE_VERSION:
            raise ConfigError(
                f"version: recipe version {self.version} is not supported (expected {RECIPE_VERSION})"
            )
        try:
            get_method(self.method)
        except UnknownMethodError as err:
            raise ConfigError(f"method: {err}") from err
        checks = [
            (
                "w_bits",
                self.w_bits in (*INT_WEIGHT_BITS, FLOAT_BITS),
                f"one of {(*INT_WEIGHT_BITS, FLOAT_BITS)}",
            ),
            ("group_size", self.group_size == 0 or self.group_size >= 8, "0 or >= 8"),
            ("w_clip", self.w_clip in ("minmax", "mse"), "minmax or mse"),
            ("a_bits", self.a_bits in (8, 16), "8 or 16"),
            ("act_granularity", self.act_granularity in ACT_GRANULARITIES, f"one of {ACT_GRANULARITIES}"),
            ("act_calibration", self.act_calibration in ACT_CALIBRATIONS, f"one of {ACT_CALIBRATIONS}"),
            ("act_percentile", 50.0 < self.act_percentile <= 100.0, "in (50, 100]"),
            ("rounding", self.rounding in ROUNDINGS, f"one of {ROUNDINGS}"),
            ("calib_frames", self.calib_frames >= 1, ">= 1"),
            ("min_calib_frames", 1 <= self.min_calib_frames <= self.calib_frames, "in [1, calib_frames]"),
            ("sweep_frames", self.sweep_frames >= 1, ">= 1"),
            ("budget", self.budget is None or 0.0 < self.budget <= 16.0, "in (0, 16]"),
        ]
        for key, ok, expected in checks:
            if not ok:
                raise ConfigError(f"{key}: {getattr(self, key)!r} is invalid (expected {expected})")
        for name, opts in self.method_options.items():
            try:
                get_method(name)
            except UnknownMethodError as err:
                raise ConfigError(f"method_options.{name}: {err}") from err
            if not isinstance(opts, dict) and opts is not None:
                raise ConfigError(f"method_options.{name}: expected a mapping")
            method_options(name, opts)  # validates keys/types, raises ConfigError naming the key

    def options_for(self, name: str | None = None) -> Any:
        """Validated Options dataclass of ``name`` (default: this recipe's method)."""
        from daptq_ros.quant.registry import method_options

        name = name or self.method
        return method_options(name, self.method_options.get(name))

    def resolved_rounding(self) -> str:
        from daptq_ros.quant.registry import get_method

        return get_method(self.method).default_rounding if self.rounding == "auto" else self.rounding


def load_recipe(source: str | Path | dict[str, Any] | None, **overrides: Any) -> QuantRecipe:
    """Load a recipe from YAML/dict and apply non-None ``overrides`` (CLI flags); validates all keys."""
    data = read_yaml(source) if isinstance(source, (str, Path)) else dict(source or {})
    if not isinstance(data, dict):
        raise ConfigError("recipe: expected a mapping at the top level")
    data = {**data, **{k: v for k, v in overrides.items() if v is not None}}
    return load_config(QuantRecipe, data)
