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
