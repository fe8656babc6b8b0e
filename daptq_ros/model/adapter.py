"""The quantizer's view of the reference VLA (:class:`ReferenceVLAAdapter`)."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from daptq_ros.policy_api import ACTION_NAMES
from daptq_ros.quant.adapter import AdapterError, PolicyAdapter
from daptq_ros.quant.fakequant import QuantLinear

INPUTS = ("image", "lang_tokens", "lang_mask", "proprio")
INTERFACE_PREFIX = "vl_action_interface"


class ReferenceVLAAdapter(PolicyAdapter):
    """PolicyAdapter for :class:`daptq_ros.model.vla.ReferenceVLA` (FP or with fake-quant layers).

    Calibration batches are dicts of tensors matching the Model I/O contract (see
    :func:`daptq_ros.model.data.calibration_batches`); flow models need the batch's fixed ``noise``
    so that FP and quantized runs see identical noise.
    """

    action_head_prefix = "action_head"
    action_space = "ee_delta"
    action_dim_names = ACTION_NAMES

    def run(self, model: nn.Module, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Forward one batch (moved to the model's device); returns normalized actions (B, H, A)."""
        missing = [k for k in INPUTS if k not in batch]
        if missing:
            raise AdapterError(f"calibration batch lacks {missing} (has {sorted(batch)})")
        device = next(model.parameters()).device
        inputs = {k: batch[k].to(device) for k in INPUTS}
        config = getattr(model, "config", None)
        if config is not None and config.uses_noise:
            if "noise" not in batch:
                raise AdapterError(
                    "the flow-head model needs a fixed 'noise' tensor (B, H, A) in every batch"
                )
            inputs["noise"] = batch["noise"].to(device)
        return model(**inputs)

    def output_layer(self, model: nn.Module) -> str | None:
        """``action_head.final``: its bias adds to every chunk step of the regression head, and to
        every Euler velocity of the flow head (Σ dt = 1, so to the integrated actions too)."""
        return "action_head.final"

    def interface_layers(self, model: nn.Module) -> list[str]:
        """The Linear layers of ``vl_action_interface`` (trunk readout → head conditioning z), float
        or already fake-quantized (CSRC runs after quantization)."""
        names = [
            name
            for name, m in model.named_modules()
            if name.startswith(INTERFACE_PREFIX + ".") and isinstance(m, (nn.Linear, QuantLinear))
        ]
        if not names:
            raise AdapterError(f"model has no Linear layers under {INTERFACE_PREFIX!r}")
        return names
