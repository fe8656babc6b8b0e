"""int8 / int4 quantization and packing of daptq_ros.gpu.packing (pure torch, CPU)."""

import pytest
import torch

from daptq_ros.gpu.packing import (
    INT4_QMAX,
    INT4_QMIN,
    Int4Weight,
    Int8Weight,
    pack_int4,
    quantize_int4_groupwise,
    quantize_int8_per_channel,
    quantize_rows_int8,
    reference_linear,
    relative_error,
    to_torch_int4pack_layout,
    unpack_int4,
)


def _sqnr_db(out: torch.Tensor, ref: torch.Tensor) -> float:
    err = (out.double() - ref.double()).pow(2).sum()
    return float(10 * torch.log10(ref.double().pow(2).sum() / err))


def test_pack_unpack_round_trip_all_nibble_pairs():
    vals = torch.arange(INT4_QMIN, INT4_QMAX + 1, dtype=torch.int8)
    pairs = torch.cartesian_prod(vals, vals)  # every (even, odd) combination, incl. -8 and 7
    q = pairs.reshape(1, -1)
    packed = pack_int4(q)
    assert packed.dtype == torch.uint8 and packed.shape == (1, q.shape[1] // 2)
    assert torch.equal(unpack_int4(packed), q)


def test_pack_layout_low_nibble_is_even_index():
    q = torch.tensor([[-1, 3, -8, 7]], dtype=torch.int8)
    packed = pack_int4(q)
    # -1 -> 0xF (low), 3 -> 0x3 (high); -8 -> 0x8 (low), 7 -> 0x7 (high)
    assert packed.tolist() == [[0x3F, 0x78]]


def test_pack_rejects_odd_length_and_floats():
    with pytest.raises(ValueError, match="even"):
        pack_int4(torch.zeros(2, 3, dtype=torch.int8))
    with pytest.raises(ValueError, match="integers"):
        pack_int4(torch.zeros(2, 4))


@pytest.mark.parametrize("group", [64, 128])
def test_int4_groupwise_grid_and_error(group):
    torch.manual_seed(0)
    w = torch.randn(48, 256) * 0.02
    q4 = quantize_int4_groupwise(w, group)
    assert q4.packed.shape == (48, 128) and q4.scales.shape == (256 // group, 48)
    assert q4.scales.dtype == torch.bfloat16
    q = q4.unpacked()
    assert int(q.min()) >= INT4_QMIN and int(q.max()) <= INT4_QMAX
    w_hat = q4.dequantize()
    # Each weight is within half a step of its group's (bf16-rounded) scale.
    step = q4.scales.float().t().repeat_interleave(group, dim=1)
    assert torch.all((w_hat - w).abs() <= 0.5 * step + 1e-7)
    assert _sqnr_db(w_hat, w) > 15.0


def test_int8_per_channel_grid_and_error():
    torch.manual_seed(1)
    w = torch.randn(32, 96)
    q8 = quantize_int8_per_channel(w)
    assert q8.q.dtype == torch.int8 and q8.scales.shape == (32,)
    assert int(q8.q.abs().max()) == 127
    assert torch.all((q8.dequantize() - w).abs() <= 0.5 * q8.scales[:, None] + 1e-7)
    assert _sqnr_db(q8.dequantize(), w) > 38.0


def test_zero_rows_quantize_to_zero():
    w = torch.zeros(4, 128)
    assert torch.count_nonzero(quantize_int4_groupwise(w, 64).dequantize()) == 0
    assert torch.count_nonzero(quantize_int8_per_channel(w).dequantize()) == 0


def test_dequant_matmul_reference_within_quantization_error():
    torch.manual_seed(2)
    x = torch.randn(5, 256)
    w = torch.randn(64, 256) * 0.02
    bias = torch.randn(64) * 0.1
    exact = x @ w.t() + bias
    y8 = reference_linear(x, quantize_int8_per_channel(w).dequantize(), bias)
    y4 = reference_linear(x, quantize_int4_groupwise(w, 128).dequantize(), bias)
    assert relative_error(y8, exact) < 1e-2
    assert relative_error(y4, exact) < 0.15
    assert relative_error(y8, exact) < relative_error(y4, exact)


def test_from_int_checkpoint_layout_round_trip():
    torch.manual_seed(3)
    w = torch.randn(16, 128)
    q4 = quantize_int4_groupwise(w, 64)
    back = Int4Weight.from_int(q4.unpacked(), q4.scales.float().t(), 64)
    assert torch.equal(back.packed, q4.packed) and torch.equal(back.scales, q4.scales)
    q8 = quantize_int8_per_channel(w)
    assert torch.equal(Int8Weight.from_int(q8.q, q8.scales[:, None]).dequantize(), q8.dequantize())
    with pytest.raises(ValueError, match="lie in"):
        Int4Weight.from_int(torch.full((16, 128), 9, dtype=torch.int8), q4.scales.float().t(), 64)
    with pytest.raises(ValueError, match="shape"):
        Int4Weight.from_int(q4.unpacked(), q4.scales.float(), 64)


def test_group_validation():
    with pytest.raises(ValueError, match="divisible"):
        quantize_int4_groupwise(torch.randn(4, 96), 64)
    with pytest.raises(ValueError, match="2-D"):
        quantize_int8_per_channel(torch.randn(4))


def test_torch_int4pack_layout_matches_our_dequant():
    torch.manual_seed(4)
    q4 = quantize_int4_groupwise(torch.randn(8, 128), 64)
    packed, scales_and_zeros = to_torch_int4pack_layout(q4)
    assert packed.shape == (8, 64) and scales_and_zeros.shape == (2, 8, 2)
    b = packed.to(torch.int16)
    u = torch.stack([b >> 4, b & 0xF], dim=-1).reshape(8, 128)  # even index in the high nibble
    scale = scales_and_zeros[..., 0].float().t().repeat_interleave(64, dim=1)
    zero = scales_and_zeros[..., 1].float().t().repeat_interleave(64, dim=1)
    assert torch.equal((u.float() - 8) * scale + zero, q4.dequantize())


def test_quantize_rows_int8():
    x = torch.tensor([[1.0, -2.0, 0.5], [0.0, 0.0, 0.0]])
    q, s = quantize_rows_int8(x)
    assert q[0].tolist() == [64, -127, 32] and q[1].tolist() == [0, 0, 0]
    assert torch.allclose(s[0], torch.tensor([2.0 / 127]))


def test_relative_error_flags_non_finite():
    ref = torch.ones(4)
    assert relative_error(ref, ref) == 0.0
    assert relative_error(torch.tensor([1.0, float("nan"), 1.0, 1.0]), ref) == float("inf")
