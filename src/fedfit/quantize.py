"""Unbiased stochastic uniform quantisation of payload tensors, with real bit packing.

Quantised uploads (Ro et al. 2022, arXiv 2204.09715) with QSGD-style stochastic rounding
(Alistarh et al. 2017). A tensor is flattened and cut into blocks (one block for the whole
tensor when ``block=0``, else contiguous runs of ``block`` elements, the last one possibly
shorter). For each block, with ``L = 2**bits - 1`` levels above the minimum:

    lo = min(x),  step = (max(x) - lo) / L,  t = (x - lo) / step          (t in [0, L])
    code = floor(t) + Bernoulli(t - floor(t)),  x_hat = lo + code * step

Unbiased: with ``f = t - floor(t)``, ``E[code] = floor(t) + f = t``, so ``E[x_hat] = x``
exactly; averaging many clients' quantised updates therefore converges to the average of the
true updates, where deterministic round-to-nearest would keep a bias of up to ``step / 2``.
Error: ``code`` is ``floor(t)`` or ``floor(t) + 1``, so ``|x_hat - x| < step`` for every
element, and ``Var[x_hat] = f (1 - f) step**2 <= step**2 / 4``. ``step`` roughly halves per
extra bit. A constant block (``max == min``) gets ``step = 0`` and code 0, and is restored
exactly.

Cost on the wire: ``ceil(numel * bits / 8)`` bytes of packed codes plus, per block, ``lo`` and
``step`` in fp32, i.e. 8 bytes per block (``packed_size``). Small blocks cut the error (the range
of a block is smaller) but the metadata grows: ``block=64`` at 4 bits adds 1 bit per element.
``lo`` and ``step`` are rounded to fp32 before codes are drawn, so the grid that is sampled is
exactly the grid that is decoded; unbiasedness then holds up to fp32 rounding (~1e-7 of the
block's range). The direction (upload or download) is the caller's business: this module knows
nothing about the engine.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from fedfit.errors import check

MAX_BITS = 8

# Wire-name separator. PyTorch forbids "." inside a module/parameter/buffer name and forbids empty
# names, so a dotted full name ("layer.0.weight") never contains "..". Decoding also splits at the
# LAST separator, and field names contain no ".", so even non-PyTorch names round-trip.
SEP = ".."
_QUANT_FIELDS = frozenset({"q", "lo", "step", "meta"})


@dataclass(frozen=True)
class CompressConfig:
    """Lossy compression of what crosses the network (engine/channel.py): unbiased stochastic
    uniform quantisation to b bits (this module). 32 = float32, no quantisation."""

    upload_bits: int = field(
        default=32, metadata={"help": "bits per number of the upload (1..8, or 32 = off)"}
    )
    download_bits: int = field(
        default=32, metadata={"help": "bits per number of the download (1..8, or 32 = off)"}
    )
    block: int = field(
        default=0, metadata={"help": "numbers sharing one scale; 0 = one scale per tensor"}
    )

    def __post_init__(self) -> None:
        for key in ("upload_bits", "download_bits"):
            bits = getattr(self, key)
            check(1 <= bits <= 8 or bits == 32, f"compress.{key}", "must be 1..8, or 32 (off)")
        check(self.block >= 0, "compress.block", "must be >= 0 (0 = per tensor)")


def _check_bits(bits: int) -> None:
    if not isinstance(bits, int) or isinstance(bits, bool) or not 1 <= bits <= MAX_BITS:
        raise ValueError(f"bits must be an int in 1..{MAX_BITS}, got {bits!r}")


def _check_block(block: int) -> None:
    if not isinstance(block, int) or isinstance(block, bool) or block < 0:
        raise ValueError(f"block must be an int >= 0 (0 = one scale per tensor), got {block!r}")


def _block_len(numel: int, block: int) -> int:
    """Elements per block: ``block``, or the whole tensor when ``block == 0`` (at least 1)."""
    return block if block > 0 else max(numel, 1)


def num_blocks(numel: int, block: int) -> int:
    """Number of scale blocks of a tensor of ``numel`` elements (0 for an empty tensor)."""
    _check_block(block)
    return math.ceil(numel / _block_len(numel, block))


def packed_size(numel: int, bits: int, block: int = 0) -> int:
    """Bytes of a quantised tensor: packed codes plus 8 bytes (fp32 lo, step) per block.

    Excludes the shape/config tensor and the safetensors header that ``encode`` adds.
    """
    _check_bits(bits)
    return math.ceil(numel * bits / 8) + 8 * num_blocks(numel, block)


# --- bit packing -------------------------------------------------------------------------------
# Eight codes of ``bits`` bits fill exactly ``bits`` bytes. Each group of 8 codes is gathered into
# one int64 word (code j at bit offset bits*j, at most 64 bits), then the word is cut into its
# ``bits`` little-endian bytes. Everything is a handful of whole-tensor ops: no Python loop over
# elements. Bit order matches numpy.packbits(bitorder="little") for bits=1.


def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack 1-D uint8 ``codes`` (each < 2**bits) into ``ceil(n * bits / 8)`` uint8 bytes."""
    _check_bits(bits)
    if codes.dtype != torch.uint8 or codes.dim() != 1:
        raise ValueError(
            f"codes must be a 1-D uint8 tensor, got {codes.dtype} {tuple(codes.shape)}"
        )
    n = codes.numel()
    if n and int(codes.max()) >= 1 << bits:
        raise ValueError(f"code {int(codes.max())} does not fit in {bits} bits")
    if bits == MAX_BITS:
        return codes.clone()
    groups = math.ceil(n / 8)
    padded = torch.zeros(groups * 8, dtype=torch.int64)
    padded[:n] = codes
    padded = padded.view(groups, 8)
    word = torch.zeros(groups, dtype=torch.int64)
    for j in range(8):
        word |= padded[:, j] << (bits * j)
    byte_shifts = torch.arange(0, 8 * bits, 8, dtype=torch.int64)
    out = ((word.unsqueeze(1) >> byte_shifts) & 0xFF).to(torch.uint8).reshape(-1)
    # Padding codes are 0, so the bytes past ceil(n*bits/8) are 0 and can be dropped.
    return out[: math.ceil(n * bits / 8)].clone()


def unpack_bits(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of ``pack_bits``: the ``n`` uint8 codes stored in ``packed``."""
    _check_bits(bits)
    want = math.ceil(n * bits / 8)
    if packed.dtype != torch.uint8 or packed.dim() != 1 or packed.numel() != want:
        raise ValueError(
            f"packed must be 1-D uint8 of {want} bytes for n={n}, bits={bits}; "
            f"got {packed.dtype} {tuple(packed.shape)}"
        )
    if bits == MAX_BITS:
        return packed.clone()
    groups = math.ceil(n / 8)
    padded = torch.zeros(groups * bits, dtype=torch.int64)
    padded[:want] = packed
    padded = padded.view(groups, bits)
    word = torch.zeros(groups, dtype=torch.int64)
    for k in range(bits):
        word |= padded[:, k] << (8 * k)
    code_shifts = torch.arange(0, 8 * bits, bits, dtype=torch.int64)
    codes = (word.unsqueeze(1) >> code_shifts) & ((1 << bits) - 1)
    return codes.to(torch.uint8).reshape(-1)[:n].clone()


# --- quantisation ------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class Quantized:
    """A quantised tensor.

    ``packed``: uint8 bit-packed codes; ``lo``, ``step``: fp32, one per block (8 bytes of
    metadata per block); ``shape``: the original shape; ``bits``, ``block`` as given to
    ``quantize`` (``block=0``: one block for the whole tensor).
    """

    packed: torch.Tensor
    lo: torch.Tensor
    step: torch.Tensor
    shape: tuple[int, ...]
    bits: int
    block: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        """Codes plus fp32 metadata, as ``packed_size``."""
        return self.packed.numel() + 4 * (self.lo.numel() + self.step.numel())


def _blocks(flat: torch.Tensor, block_len: int) -> torch.Tensor:
    """``flat`` as (blocks, block_len), the short last block padded with its own last value.

    Padding with a value already in the block leaves its min and max unchanged.
    """
    n = flat.numel()
    pad = -n % block_len
    if pad:
        flat = torch.cat([flat, flat[-1:].expand(pad)])
    return flat.view(-1, block_len)


def quantize(
    x: torch.Tensor, bits: int, block: int = 0, generator: torch.Generator | None = None
) -> Quantized:
    """Stochastic uniform quantisation of ``x`` to ``bits`` bits (see the module docstring).

    ``block=0``: one (lo, step) for the whole tensor; ``block>0``: one per contiguous run of
    ``block`` elements of the flattened tensor. ``generator`` (CPU) draws the rounding; the same
    seed gives the same codes. Raises ValueError on non-float or non-finite input.
    """
    _check_bits(bits)
    _check_block(block)
    if not x.is_floating_point():
        raise ValueError(f"quantize needs a floating-point tensor, got {x.dtype}")
    # float64 keeps t = (x - lo) / step accurate for any fp32/bf16/fp16 input.
    flat = x.detach().to("cpu", torch.float64).reshape(-1)
    finite = torch.isfinite(flat)
    if not bool(finite.all()):
        nan = int(torch.isnan(flat).sum())
        raise ValueError(
            f"quantize: input has {nan} NaN and {flat.numel() - nan - int(finite.sum())} inf "
            "entries; refusing to quantise a non-finite tensor"
        )
    n = flat.numel()
    levels = (1 << bits) - 1
    if n == 0:
        empty = torch.zeros(0, dtype=torch.float32)
        no_codes = torch.zeros(0, dtype=torch.uint8)
        return Quantized(no_codes, empty, empty.clone(), tuple(x.shape), bits, block)
    blocks = _blocks(flat, _block_len(n, block))
    lo32 = blocks.amin(dim=1).to(torch.float32)
    step32 = ((blocks.amax(dim=1) - blocks.amin(dim=1)) / levels).to(torch.float32)
    if not bool(torch.isfinite(step32).all()):
        raise ValueError("quantize: a block's range overflows fp32; rescale the tensor")
    lo, step = lo32.to(torch.float64).unsqueeze(1), step32.to(torch.float64).unsqueeze(1)
    # Constant block (step 0): t = 0, so code 0 and x_hat = lo = x. Never divide by zero.
    t = torch.where(step > 0, (blocks - lo) / torch.where(step > 0, step, 1.0), 0.0)
    floor = torch.floor(t)
    up = torch.rand(t.shape, generator=generator, dtype=torch.float64) < (t - floor)
    # Clamp: fp32 rounding of lo/step can push t a hair outside [0, L].
    codes = (floor + up).clamp_(0, levels).to(torch.uint8).reshape(-1)[:n]
    return Quantized(pack_bits(codes, bits), lo32, step32, tuple(x.shape), bits, block)


def dequantize(q: Quantized) -> torch.Tensor:
    """``lo + code * step`` per block, as float32 in the original shape."""
    n = q.numel
    if n == 0:
        return torch.zeros(q.shape, dtype=torch.float32)
    codes = unpack_bits(q.packed, q.bits, n).to(torch.float32)
    blocks = _blocks(codes, _block_len(n, q.block))
    if blocks.shape[0] != q.lo.numel() or q.step.numel() != q.lo.numel():
        raise ValueError(f"{blocks.shape[0]} blocks but {q.lo.numel()} lo, {q.step.numel()} step")
    out = q.lo.float().unsqueeze(1) + blocks * q.step.float().unsqueeze(1)
    return out.reshape(-1)[:n].reshape(q.shape)


# --- wire format -------------------------------------------------------------------------------


def encode(
    payload: Mapping[str, torch.Tensor],
    bits: int,
    block: int = 0,
    generator: torch.Generator | None = None,
) -> dict[str, torch.Tensor]:
    """Quantise every floating tensor of ``payload`` into flat wire tensors.

    A float tensor ``name`` becomes ``name..q`` (uint8 packed codes), ``name..lo`` and
    ``name..step`` (fp32, one per block) and ``name..meta`` (int64 ``[bits, block, *shape]``).
    Non-float tensors (seeds, counts) are sent exactly as ``name..raw``: quantising them would
    corrupt them. ``compress.payload_bytes(encode(...))`` is then the real packed size.
    """
    _check_bits(bits)
    _check_block(block)
    wire: dict[str, torch.Tensor] = {}
    for name, tensor in payload.items():
        if not tensor.is_floating_point():
            wire[name + SEP + "raw"] = tensor.detach()
            continue
        q = quantize(tensor, bits, block, generator)
        wire[name + SEP + "q"] = q.packed
        wire[name + SEP + "lo"] = q.lo
        wire[name + SEP + "step"] = q.step
        wire[name + SEP + "meta"] = torch.tensor([bits, block, *q.shape], dtype=torch.int64)
    return wire


def decode(wire: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Inverse of ``encode``: float32 tensors of the original shapes (raw tensors as sent)."""
    fields: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in wire.items():
        name, sep, field = key.rpartition(SEP)
        if not sep or field not in _QUANT_FIELDS | {"raw"}:
            raise ValueError(f"not an encoded payload key: {key!r}")
        fields.setdefault(name, {})[field] = tensor
    out: dict[str, torch.Tensor] = {}
    for name, parts in fields.items():
        if set(parts) == {"raw"}:
            out[name] = parts["raw"]
            continue
        if set(parts) != _QUANT_FIELDS:
            raise ValueError(
                f"{name!r}: expected fields {sorted(_QUANT_FIELDS)}, got {sorted(parts)}"
            )
        bits, block, *shape = (int(v) for v in parts["meta"].tolist())
        _check_bits(bits)
        _check_block(block)
        q = Quantized(parts["q"], parts["lo"], parts["step"], tuple(shape), bits, block)
        out[name] = dequantize(q)
    return out
