"""GPU side of the speed benchmark: small-M quantized matmul kernels (Triton), trunks, benchmark.

Modules: :mod:`~daptq_ros.gpu.packing` (quantize / pack, pure torch), :mod:`~daptq_ros.gpu.kernels`
(Triton W8A16 / W4A16 kernels, ``torch._int_mm`` W8A8, bounded autotuner; Triton imported lazily),
:mod:`~daptq_ros.gpu.linear` (swappable Linear variants), :mod:`~daptq_ros.gpu.trunk` (random-weight
trunks), :mod:`~daptq_ros.gpu.timing` / :mod:`~daptq_ros.gpu.report` / :mod:`~daptq_ros.gpu.bench`
(``python -m daptq_ros.gpu.bench --json out.json``). Importing this package needs only torch.
"""

from daptq_ros.gpu.kernels import triton_available, w4a16_linear, w8a8_linear, w8a16_linear
from daptq_ros.gpu.packing import (
    Int4Weight,
    Int8Weight,
    pack_int4,
    quantize_int4_groupwise,
    quantize_int8_per_channel,
    unpack_int4,
)

__all__ = [
    "Int4Weight",
    "Int8Weight",
    "pack_int4",
    "quantize_int4_groupwise",
    "quantize_int8_per_channel",
    "triton_available",
    "unpack_int4",
    "w4a16_linear",
    "w8a8_linear",
    "w8a16_linear",
]
