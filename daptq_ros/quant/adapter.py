"""The policy adapter: what the quantizer needs to know about any PyTorch policy.

The quantizer never imports a specific model. A user points it at their own policy by
subclassing :class:`PolicyAdapter` (see ``daptq_ros.model.adapter.ReferenceVLAAdapter`` for the
shipped reference VLA).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping

import torch
from torch import nn

ACTION_SPACES = ("ee_delta", "joint")


class AdapterError(ValueError):
    """The adapter and the model do not fit together (names, shapes, outputs)."""


class PolicyAdapter(ABC):
    """Describes a policy to the quantizer.

    Attributes:
        action_head_prefix: module-name prefix of the action head (e.g. ``"action_head"``).
        action_space: ``"ee_delta"`` (end-effector deltas, virtual-chain Jacobian) or ``"joint"``.
        action_dim_names: names of the action dimensions, in order.
    """

    action_head_prefix: str = ""
    action_space: str = "ee_delta"
    action_dim_names: tuple[str, ...] = ()

    @abstractmethod
    def run(self, model: nn.Module, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Forward one calibration batch; return the (normalized) actions, shape (B, H, A)."""

    def quantizable_layers(self, model: nn.Module) -> list[str]:
        """Names of the Linear/Conv2d modules eligible for quantization (default: all of them)."""
        return [name for name, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]

    @abstractmethod
    def interface_layers(self, model: nn.Module) -> list[str]:
        """Names of the Linear layers forming the vision-language -> action interface."""

    def output_layer(self, model: nn.Module) -> str | None:
        """Name of the Linear whose bias is added to every predicted (normalized) action step, if any.

        DA-PTQ's output bias correction shifts this bias by the mean action error against FP on
        calibration frames. Default None (no such layer: the correction is skipped).
        """
        return None

    def action_to_raw(self, actions: torch.Tensor) -> torch.Tensor:
        """Map normalized actions to raw units (default: identity). Used for the drift Jacobian."""
        return actions

    def targets(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor | None:
        """Demonstrated (normalized) action chunks (B, H, A) of a batch, if it has them.

        Default: ``batch["actions"]`` when present. Only DA-PTQ's paper-faithful layer score (a
        gradient of the drift-weighted loss at the FP model) needs ground truth.
        """
        value = batch.get("actions")
        return value if isinstance(value, torch.Tensor) else None

    def joint_jacobian(self, actions_raw: torch.Tensor) -> torch.Tensor:
        """Kinematic Jacobian (N, C, A) at raw joint-space actions (N, A), for ``action_space="joint"``.

        Joint-space policies must override this (or give ``drift.jacobian_matrix`` in the recipe).
        """
        raise AdapterError(
            f"{type(self).__name__} has no joint_jacobian(); override it or set drift.jacobian_matrix"
        )

    def attention_modules(self, model: nn.Module) -> dict[str, int]:
        """Attention modules (name -> number of heads): modules with q/k/v/o_proj children and a
        ``heads``/``num_heads``/``n_heads`` attribute; q and k must be split into heads as
        ``(..., heads, dim // heads)`` with softmax(q kᵀ / sqrt(d)) and no norm after q (QuantVLA ATM).
        """
        found: dict[str, int] = {}
        for name, m in model.named_modules():
            if all(hasattr(m, p) for p in ("q_proj", "k_proj", "v_proj", "o_proj")):
                heads = next(
                    (getattr(m, a) for a in ("heads", "num_heads", "n_heads") if hasattr(m, a)), None
                )
                if not isinstance(heads, int):
                    raise AdapterError(f"attention module {name!r} has no integer heads/num_heads attribute")
                found[name] = heads
        return found

    def validate(self, model: nn.Module, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Check that names exist and :meth:`run` returns a finite (B, H, A) tensor; returns it."""
        if self.action_space not in ACTION_SPACES:
            raise AdapterError(f"action_space must be one of {ACTION_SPACES}, got {self.action_space!r}")
        modules = dict(model.named_modules())
        for name in [*self.quantizable_layers(model), *self.interface_layers(model)]:
            if name not in modules:
                raise AdapterError(f"adapter names module {name!r}, which the model does not have")
        with torch.no_grad():
            out = self.run(model, batch)
        if not isinstance(out, torch.Tensor) or out.dim() != 3:
            shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise AdapterError(f"adapter.run must return a (B, H, A) tensor, got {shape}")
        if self.action_dim_names and out.shape[-1] != len(self.action_dim_names):
            raise AdapterError(
                f"adapter.run returned {out.shape[-1]} action dims, adapter names "
                f"{len(self.action_dim_names)}: {self.action_dim_names}"
            )
        if not torch.isfinite(out).all():
            raise AdapterError("adapter.run returned NaN/Inf actions on the calibration batch")
        return out
