"""daptq_ros.quant: drift-aware post-training quantization for PyTorch policies.

Public API (torchao style, model modified in place)::

    from daptq_ros.quant import quantize_policy, load_recipe
    result = quantize_policy(model, adapter, calib_batches, load_recipe("config/quantize.yaml"))
"""

from daptq_ros.quant.adapter import AdapterError, PolicyAdapter
from daptq_ros.quant.api import QuantContext, QuantResult, quantize_policy
from daptq_ros.quant.budget import BudgetError
from daptq_ros.quant.calibration import CalibrationError
from daptq_ros.quant.checkpoint import QuantInfo, load_quantized, save_quantized
from daptq_ros.quant.drift_loss import DriftLoss, DriftOptions
from daptq_ros.quant.fakequant import LayerSpec, QuantConv2d, QuantLinear
from daptq_ros.quant.recipe import QuantRecipe, load_recipe
from daptq_ros.quant.registry import UnknownMethodError, available_methods, register_method

__all__ = [
    "AdapterError",
    "BudgetError",
    "CalibrationError",
    "DriftLoss",
    "DriftOptions",
    "LayerSpec",
    "PolicyAdapter",
    "QuantContext",
    "QuantConv2d",
    "QuantInfo",
    "QuantLinear",
    "QuantRecipe",
    "QuantResult",
    "UnknownMethodError",
    "available_methods",
    "load_quantized",
    "load_recipe",
    "quantize_policy",
    "register_method",
    "save_quantized",
]
