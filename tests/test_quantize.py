"""Stochastic uniform quantisation and bit packing (fedfit.quantize) against closed forms.

References used below, independent of fedfit.quantize:
- bit packing: numpy.packbits(bitorder="little") for bits=1, and a bit-by-bit Python loop
  (code i's bit k lands at stream bit i*bits + k, little-endian within bytes) for every bits;
- stochastic rounding with fractional part f has E[code] = t and Var = f (1 - f) step^2, so the
  mean of N draws deviates from x by at most 5 * step / (2 * sqrt(N)) at 5 sigma;
- the step of b bits is range / (2**b - 1), so step(b) / step(b + 1) = (2**(b+1) - 1) / (2**b - 1).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fedfit import payload as wire_format
from fedfit.quantize import (
    SEP,
    Quantized,
    decode,
    dequantize,
    encode,
    pack_bits,
    packed_size,
    quantize,
    unpack_bits,
)


def reference_pack(codes: list[int], bits: int) -> bytes:
    """Bit-by-bit packing: bit k of code i is bit (i*bits + k) of the little-endian stream."""
    out = bytearray(math.ceil(len(codes) * bits / 8))
    for i, code in enumerate(codes):
        for k in range(bits):
            if code >> k & 1:
                pos = i * bits + k
                out[pos // 8] |= 1 << (pos % 8)
    return bytes(out)


def per_element_step(q: Quantized) -> torch.Tensor:
    """The step of each element's block, flattened."""
    block = q.block if q.block > 0 else q.numel
    return q.step.repeat_interleave(block)[: q.numel]


# --- packing -----------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("n", [0, 1, 7, 8, 9, 1000, 4097])
def test_pack_round_trip_and_length(bits: int, n: int) -> None:
    g = torch.Generator().manual_seed(1000 * bits + n)
    codes = torch.randint(0, 1 << bits, (n,), dtype=torch.uint8, generator=g)
    packed = pack_bits(codes, bits)
    assert packed.dtype == torch.uint8 and packed.numel() == math.ceil(n * bits / 8)
    assert torch.equal(unpack_bits(packed, bits, n), codes)


@pytest.mark.parametrize("bits", range(1, 9))
def test_pack_matches_bit_by_bit_reference(bits: int) -> None:
    g = torch.Generator().manual_seed(bits)
    codes = torch.randint(0, 1 << bits, (37,), dtype=torch.uint8, generator=g)
    assert bytes(pack_bits(codes, bits).tolist()) == reference_pack(codes.tolist(), bits)


def test_pack_one_bit_matches_numpy_packbits() -> None:
    codes = torch.randint(
        0, 2, (1001,), dtype=torch.uint8, generator=torch.Generator().manual_seed(0)
    )
    expected = np.packbits(codes.numpy(), bitorder="little")
    np.testing.assert_array_equal(pack_bits(codes, 1).numpy(), expected)


def test_pack_hand_computed_three_bits() -> None:
    # codes 1..7,0 at 3 bits: word = sum(c_j << 3j) = 0b000_111_110_101_100_011_010_001
    # = 0x1F58D1 -> little-endian bytes D1 58 1F (hand-computed).
    codes = torch.tensor([1, 2, 3, 4, 5, 6, 7, 0], dtype=torch.uint8)
    assert pack_bits(codes, 3).tolist() == [0xD1, 0x58, 0x1F]


def test_pack_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="does not fit in 3 bits"):
        pack_bits(torch.tensor([8], dtype=torch.uint8), 3)
    with pytest.raises(ValueError, match="uint8"):
        pack_bits(torch.tensor([1], dtype=torch.int64), 3)
    with pytest.raises(ValueError, match="bits"):
        pack_bits(torch.tensor([1], dtype=torch.uint8), 9)
    with pytest.raises(ValueError, match="3 bytes"):
        unpack_bits(torch.zeros(2, dtype=torch.uint8), 3, 8)


# --- unbiasedness and error --------------------------------------------------------------------


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
@pytest.mark.parametrize("block", [0, 64])
def test_unbiased_and_round_to_nearest_is_not(bits: int, block: int) -> None:
    n, draws = 256, 4000
    x = torch.randn(n, generator=torch.Generator().manual_seed(7))
    # N independent quantisations in one call: repeating x leaves each block's min/max (so lo,
    # step and the grid) unchanged, since 64 divides 256 and the per-tensor range is x's range.
    q = quantize(x.repeat(draws), bits, block, torch.Generator().manual_seed(bits))
    samples = dequantize(q).view(draws, n).double()
    step = per_element_step(q)[:n].double()
    single = quantize(x, bits, block)
    assert torch.equal(q.lo[: single.lo.numel()], single.lo)
    assert torch.equal(q.step[: single.step.numel()], single.step)

    bound = 5 * step / (2 * math.sqrt(draws))
    err = (samples.mean(0) - x.double()).abs()
    assert bool((err <= bound).all()), float((err / bound).max())

    # Variance matches f (1 - f) step^2 (<= step^2 / 4) from the closed form.
    lo = q.lo.double().repeat_interleave(block if block else n)[:n]
    t = torch.where(step > 0, (x.double() - lo) / step, 0.0)
    f = t - t.floor()
    expected_var = f * (1 - f) * step**2
    var = samples.var(0)
    assert bool((var <= step**2 / 4 * 1.25).all())
    assert float(var.sum() / expected_var.sum()) == pytest.approx(1.0, abs=0.05)

    # Not vacuous: round-to-nearest on the same grid is off by more than the bound.
    nearest = lo + t.round().clamp(0, 2**bits - 1) * step
    assert float(((nearest - x.double()).abs() / bound).max()) > 3


@pytest.mark.parametrize("block", [0, 100])
def test_error_below_step_and_step_halves_per_bit(block: int) -> None:
    x = torch.rand(100_000, generator=torch.Generator().manual_seed(3)) * 2 - 1
    rms = []
    for bits in range(1, 9):
        q = quantize(x, bits, block, torch.Generator().manual_seed(bits))
        err = (dequantize(q) - x).abs()
        step = per_element_step(q)
        assert bool((err <= step * (1 + 1e-6)).all()), bits
        assert float(err.max()) > 0.9 * float(step.max())  # the bound is nearly reached
        rms.append(float(err.pow(2).mean().sqrt()))
    for bits in range(1, 8):
        # x uniform -> the fractional part is uniform -> rms error = step / sqrt(6) for every b.
        step_ratio = (2 ** (bits + 1) - 1) / (2**bits - 1)
        assert rms[bits - 1] / rms[bits] == pytest.approx(step_ratio, rel=0.05), bits
        assert 1.9 < rms[bits - 1] / rms[bits] < 3.1


@pytest.mark.parametrize("bits", [1, 3, 8])
def test_constant_tensor_and_constant_block_exact(bits: int) -> None:
    const = torch.full((5, 7), 3.7)
    q = quantize(const, bits)
    assert float(q.step) == 0.0 and torch.equal(dequantize(q), const)

    g = torch.Generator().manual_seed(0)
    x = torch.cat(
        [torch.randn(64, generator=g), torch.full((64,), -1.25), torch.randn(10, generator=g)]
    )
    q = quantize(x, bits, 64, g)
    y = dequantize(q)
    assert q.step.tolist()[1] == 0.0 and torch.equal(y[64:128], x[64:128])
    assert not torch.equal(y[:64], x[:64])


def test_eight_bits_per_block_error_within_range_over_255() -> None:
    x = torch.randn(64 * 50 + 13, generator=torch.Generator().manual_seed(5)) * 10
    q = quantize(x, 8, 64, torch.Generator().manual_seed(1))
    err = (dequantize(q) - x).abs()
    for i in range(q.lo.numel()):
        block = x[64 * i : 64 * (i + 1)]
        limit = float(block.max() - block.min()) / 255
        assert float(err[64 * i : 64 * (i + 1)].max()) <= limit * (1 + 1e-6)


def test_quantize_guards() -> None:
    x = torch.randn(10)
    for bad in (0, 9, -1):
        with pytest.raises(ValueError, match="bits"):
            quantize(x, bad)
    with pytest.raises(ValueError, match="block"):
        quantize(x, 4, -1)
    with pytest.raises(ValueError, match="1 NaN and 2 inf"):
        quantize(torch.tensor([1.0, float("nan"), float("inf"), -float("inf")]), 4)
    with pytest.raises(ValueError, match="floating"):
        quantize(torch.arange(4), 4)


def test_same_seed_same_codes_different_seed_different_codes() -> None:
    x = torch.randn(1000, generator=torch.Generator().manual_seed(0))

    def codes(seed: int) -> torch.Tensor:
        return quantize(x, 4, 128, torch.Generator().manual_seed(seed)).packed

    assert torch.equal(codes(1), codes(1))
    assert not torch.equal(codes(1), codes(2))


# --- wire format -------------------------------------------------------------------------------


def test_encode_decode_round_trip() -> None:
    g = torch.Generator().manual_seed(0)
    payload = {
        "encoder.layer.0.attention.query.weight": torch.randn(8, 6, generator=g),
        "encoder.layer.0.attention.query.bias": torch.randn(6, generator=g).to(torch.bfloat16),
        "a/b.weight": torch.randn(3, 2, 2, generator=g),  # ModuleDict keys may hold "/"
        "scale": torch.tensor(2.5),
        "empty": torch.zeros(0, 3),
        "seeds": torch.tensor([11, 12, 13], dtype=torch.int64),
    }
    wire = wire_format.deserialize(wire_format.serialize(encode(payload, 3, 16, g)))
    assert all(SEP in key for key in wire)
    out = decode(wire)
    assert sorted(out) == sorted(payload)  # safetensors stores keys sorted
    assert torch.equal(out["seeds"], payload["seeds"])  # sent raw, not quantised
    for name, x in payload.items():
        assert out[name].shape == x.shape
        if x.is_floating_point():
            assert out[name].dtype == torch.float32
        if x.is_floating_point() and x.numel():
            step = float(wire[name + SEP + "step"].max())
            assert float((out[name] - x.float()).abs().max()) <= step * (1 + 1e-6)
    assert torch.equal(out["scale"], payload["scale"])  # one element: constant block, exact


@pytest.mark.parametrize("bits,block", [(4, 0), (4, 64), (1, 0), (8, 4096)])
def test_payload_bytes_is_packed_size_plus_header(bits: int, block: int) -> None:
    x = torch.randn(1000, 1000, generator=torch.Generator().manual_seed(0))
    raw = wire_format.payload_bytes({"w": x})
    wire = encode({"w": x}, bits, block, torch.Generator().manual_seed(0))
    data = wire_format.serialize(wire)
    header = 8 + int.from_bytes(data[:8], "little")
    meta = 8 * (2 + x.dim())  # int64 [bits, block, rows, cols]
    assert wire_format.payload_bytes(wire) == packed_size(x.numel(), bits, block) + meta + header
    assert header < 400
    codes_ratio = bits / 32 + (8 / (4 * block) if block else 0.0)
    assert wire_format.payload_bytes(wire) / raw == pytest.approx(codes_ratio, rel=0.01)


def test_packed_size_counts() -> None:
    assert packed_size(1_000_000, 4) == 500_000 + 8
    assert packed_size(1_000_000, 4, 64) == 500_000 + 8 * 15_625
    assert packed_size(10, 3, 4) == 4 + 8 * 3
    assert packed_size(0, 5) == 0
