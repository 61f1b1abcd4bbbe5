"""Quantization primitives: bit packing, group-wise and row-wise (de)quantization, NF4.

Pure tensor math, no ``nn.Module`` and no transform logic: ``passes.quantize`` builds its
formats from these, and a low-rank + quantized family can reuse them as they are.

Conventions shared by every function here:

- A weight is a 2-D ``(rows, cols)`` matrix; groups run along ``cols`` (the input dimension
  of a linear map, the embedding dimension of a table), ``group_size`` consecutive values
  each. Column counts a group size does not divide are padded with zeros on the right
  (:func:`pad_columns`); the padded codes are real storage and callers count them.
- All arithmetic is fp32 whatever the weight's dtype; dequantizers take the output dtype.
- Codes are ``uint8`` tensors holding values ``< 2**bits`` before packing; :func:`pack`
  stores them densely (int4 two per byte, int2 four per byte, int3 eight per three bytes).
- Constants (scales, minima, absmax) come out as fp32; the caller decides how to store them
  (fp16, or :func:`quantize_constants` for double quantization) and passes the *stored*
  values back in, so that codes are rounded against the constants the model will really use.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = [
    "CONSTANT_BLOCK",
    "NF4_CODEBOOK",
    "PACK_BITS",
    "dequantize_constants",
    "dequantize_groups",
    "group_minmax",
    "int8_rowwise",
    "int8_rowwise_dequantize",
    "nf4_absmax",
    "nf4_dequantize",
    "nf4_quantize",
    "pack",
    "packed_nbytes",
    "pad_columns",
    "padded_columns",
    "quantize_constants",
    "quantize_groups",
    "unpack",
]

#: Code widths :func:`pack` handles.
PACK_BITS = (2, 3, 4)

#: Groups of first-level constants that share one fp32 (scale, offset) in double quantization.
CONSTANT_BLOCK = 256

#: QLoRA's NormalFloat-4 code values (Dettmers et al. 2023, bitsandbytes ``create_normal_map``):
#: quantiles of N(0, 1) scaled to [-1, 1], 8 positive and 7 negative levels plus an exact 0.
NF4_CODEBOOK = torch.tensor(
    [
        -1.0,
        -0.6961928009986877,
        -0.5250730514526367,
        -0.39491748809814453,
        -0.28444138169288635,
        -0.18477343022823334,
        -0.09105003625154495,
        0.0,
        0.07958029955625534,
        0.16093020141124725,
        0.24611230194568634,
        0.33791524171829224,
        0.44070982933044434,
        0.5626170039176941,
        0.7229568362236023,
        1.0,
    ]
)
# Nearest-code boundaries: bucketize against them instead of an argmin over 16 distances.
_NF4_MIDPOINTS = (NF4_CODEBOOK[1:] + NF4_CODEBOOK[:-1]) / 2

_TINY = 1e-30  # divisor floor for all-equal groups (scale 0); their codes are 0 either way


def _word(bits: int) -> tuple[int, int]:
    """(values, bytes) per packing word: the smallest whole number of bytes holding whole codes."""
    if bits not in PACK_BITS:
        raise ValueError(f"pack/unpack handle bits in {PACK_BITS}, got {bits!r}")
    word_bits = bits * 8 // math.gcd(bits, 8)  # lcm(bits, 8): 8 for int2/int4, 24 for int3
    return word_bits // bits, word_bits // 8


def packed_nbytes(numel: int, bits: int) -> int:
    """Bytes :func:`pack` produces for ``numel`` codes (the last word is padded with zeros)."""
    values, nbytes = _word(bits)
    return -(-numel // values) * nbytes


def pack(q: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack codes densely, little-endian within each word, in row-major order of ``q``.

    Args:
        q: ``uint8`` codes, any shape, each ``< 2**bits``.
        bits: 2, 3 or 4.

    Returns:
        1-D ``uint8`` of :func:`packed_nbytes` bytes. A count that does not fill the last word
        is padded with zero codes; :func:`unpack` takes the true count back.
    """
    values, nbytes = _word(bits)
    flat = q.reshape(-1)
    if flat.dtype != torch.uint8:
        raise TypeError(f"pack takes uint8 codes, got {flat.dtype}")
    flat = F.pad(flat, (0, -flat.numel() % values)).to(torch.int32).view(-1, values)
    word = (flat << (bits * torch.arange(values, device=q.device, dtype=torch.int32))).sum(1, dtype=torch.int32)
    shifts = 8 * torch.arange(nbytes, device=q.device, dtype=torch.int32)
    return ((word[:, None] >> shifts) & 0xFF).to(torch.uint8).reshape(-1)


def unpack(packed: torch.Tensor, bits: int, numel: int) -> torch.Tensor:
    """Inverse of :func:`pack`: the first ``numel`` codes as a 1-D ``uint8`` tensor.

    ``packed`` may also be 2-D ``(rows, row_bytes)`` with whole words per row (each row
    packed on its own, e.g. rows gathered from a packed matrix); rows are then unpacked
    independently and the result is ``(rows, numel)``.
    """
    values, nbytes = _word(bits)
    lead = packed.shape[:-1] if packed.dim() == 2 else ()
    if nbytes == 1:
        # int4/int2: each byte holds whole codes, so shift and mask the uint8 bytes themselves
        # (no int32 words: 4–5× faster on CPU, where every forward unpacks its weight).
        mask = (1 << bits) - 1
        parts = [(packed >> (bits * i)) & mask for i in range(values)]
        return torch.stack(parts, -1).reshape(*lead, -1)[..., :numel]
    words = packed.reshape(*lead, -1, nbytes).to(torch.int32)
    word = (words << (8 * torch.arange(nbytes, device=packed.device, dtype=torch.int32))).sum(-1, dtype=torch.int32)
    shifts = bits * torch.arange(values, device=packed.device, dtype=torch.int32)
    codes = ((word[..., None] >> shifts) & ((1 << bits) - 1)).to(torch.uint8).reshape(*lead, -1)
    return codes[..., :numel]


def padded_columns(cols: int, group_size: int) -> int:
    """``cols`` rounded up to a multiple of ``group_size``."""
    return -(-cols // group_size) * group_size


def pad_columns(w: torch.Tensor, group_size: int) -> torch.Tensor:
    """``w`` as fp32 with zero columns appended up to a multiple of ``group_size`` (no copy if none)."""
    extra = padded_columns(w.shape[1], group_size) - w.shape[1]
    return F.pad(w.float(), (0, extra)) if extra else w.float().contiguous()


def _groups(w: torch.Tensor, group_size: int) -> torch.Tensor:
    """``(rows, n_groups, group_size)`` fp32 view of the zero-padded weight."""
    return pad_columns(w, group_size).view(w.shape[0], -1, group_size)


def group_minmax(w: torch.Tensor, bits: int, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Asymmetric round-to-nearest constants per group: ``scale = (max − min)/(2^bits − 1)``, ``min``.

    Returns:
        ``(scale, minimum)``, fp32, each ``(rows, n_groups)``; padded zeros take part in the
        last group's range.
    """
    g = _groups(w, group_size)
    lo, hi = g.amin(-1), g.amax(-1)
    return (hi - lo) / ((1 << bits) - 1), lo


def quantize_groups(
    w: torch.Tensor,
    bits: int,
    group_size: int,
    scale: torch.Tensor | None = None,
    minimum: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric round-to-nearest per group: ``q = clamp(round((w − min)/scale), 0, 2^bits − 1)``.

    Args:
        w: ``(rows, cols)`` weight, any float dtype.
        bits: code width (1 … 8; packing handles 2, 3, 4).
        group_size: consecutive columns sharing one (scale, min).
        scale, minimum: ``(rows, n_groups)`` constants to round against, typically the stored
            (fp16 or double-quantized) versions of :func:`group_minmax`'s; computed when omitted.

    Returns:
        ``(q, scale, minimum)``: ``uint8`` codes ``(rows, padded cols)`` and the fp32 constants
        used. With exact constants every value is within ``scale/2`` of its reconstruction.
    """
    if scale is None or minimum is None:
        scale, minimum = group_minmax(w, bits, group_size)
    scale, minimum = scale.float(), minimum.float()
    g = _groups(w, group_size)
    q = (g - minimum[..., None]).div_(scale.clamp_min(_TINY)[..., None]).round_().clamp_(0, (1 << bits) - 1)
    return q.to(torch.uint8).view(w.shape[0], -1), scale, minimum


def dequantize_groups(
    q: torch.Tensor,
    scale: torch.Tensor,
    minimum: torch.Tensor,
    cols: int | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """``q · scale + min`` per group; the group size is ``q.shape[1] / scale.shape[1]``.

    Args:
        q: ``(rows, padded cols)`` codes.
        scale, minimum: ``(rows, n_groups)`` constants (any float dtype).
        cols: crop the padding back to this many columns (default: keep all).
        dtype: output dtype.
    """
    rows, n_groups = scale.shape
    g = torch.addcmul(minimum.float()[..., None], q.view(rows, n_groups, -1).float(), scale.float()[..., None])
    return g.view(rows, -1)[:, :cols].to(dtype)


def quantize_constants(x: torch.Tensor, block_size: int = CONSTANT_BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """Second-level (double) quantization of first-level constants, QLoRA / LQ-LoRA style.

    ``x`` is flattened and cut into blocks of ``block_size`` values; each block is stored as
    ``uint8`` codes with an fp32 ``(scale, offset)`` pair, asymmetric round-to-nearest
    (``scale = (max − min)/255``, ``offset = min``). Every value is reconstructed within
    ``scale/2``, i.e. 1/510 of its block's range. A ragged last block is padded internally by
    repeating its last value (which leaves its range unchanged); the padding is not stored.

    Returns:
        ``(codes, blocks)``: ``uint8`` of ``x``'s shape and fp32 ``(n_blocks, 2)`` holding
        ``[scale, offset]`` per block.
    """
    flat = x.reshape(-1).float()
    n = flat.numel()
    extra = -n % block_size
    if extra:
        flat = torch.cat([flat, flat[-1:].expand(extra)])
    b = flat.view(-1, block_size)
    lo, hi = b.amin(1), b.amax(1)
    scale = (hi - lo) / 255
    q = torch.round((b - lo[:, None]) / scale.clamp_min(_TINY)[:, None]).clamp_(0, 255).to(torch.uint8)
    # clone: a slice would keep the padded block alive in its storage (and in stored bytes)
    return q.reshape(-1)[:n].clone().view(x.shape), torch.stack([scale, lo], 1)


def dequantize_constants(codes: torch.Tensor, blocks: torch.Tensor, block_size: int = CONSTANT_BLOCK) -> torch.Tensor:
    """Inverse of :func:`quantize_constants`: fp32 values of ``codes``' shape."""
    flat = codes.reshape(-1).float()
    index = torch.arange(flat.numel(), device=codes.device) // block_size
    blocks = blocks.float()
    return (flat * blocks[index, 0] + blocks[index, 1]).view(codes.shape)


def nf4_absmax(w: torch.Tensor, group_size: int) -> torch.Tensor:
    """Per-group ``max |w|``, fp32 ``(rows, n_groups)``: NF4's only constant."""
    return _groups(w, group_size).abs().amax(-1)


def nf4_quantize(
    w: torch.Tensor, group_size: int, absmax: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """NormalFloat-4: each value of a group, divided by the group's absmax, to its nearest code.

    Args:
        w: ``(rows, cols)`` weight.
        group_size: consecutive columns sharing one absmax.
        absmax: ``(rows, n_groups)`` stored absmax to round against (default: exact).

    Returns:
        ``(q, absmax)``: ``uint8`` code indices (0 … 15) ``(rows, padded cols)`` and the fp32
        absmax used. Padded zeros map to the exact 0 code.
    """
    if absmax is None:
        absmax = nf4_absmax(w, group_size)
    absmax = absmax.float()
    g = _groups(w, group_size) / absmax.clamp_min(_TINY)[..., None]
    q = torch.bucketize(g, _NF4_MIDPOINTS.to(g.device))
    return q.to(torch.uint8).view(w.shape[0], -1), absmax


def nf4_dequantize(
    q: torch.Tensor, absmax: torch.Tensor, cols: int | None = None, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """``codebook[q] · absmax`` per group, cropped to ``cols`` columns, in ``dtype``."""
    rows, n_groups = absmax.shape
    values = NF4_CODEBOOK.to(q.device)[q.long()].view(rows, n_groups, -1).mul_(absmax.float()[..., None])
    return values.view(rows, -1)[:, :cols].to(dtype)


def int8_rowwise(w: torch.Tensor, scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per row: ``scale = max|w_row| / 127``, ``q = clamp(round(w/scale), −127, 127)``.

    Args:
        w: ``(rows, cols)`` weight.
        scale: ``(rows,)`` stored scale to round against (default: exact).

    Returns:
        ``(q, scale)``: ``int8`` codes ``(rows, cols)`` and the fp32 scale used.
    """
    wf = w.float()
    if scale is None:
        scale = wf.abs().amax(1) / 127
    scale = scale.float()
    q = torch.round(wf / scale.clamp_min(_TINY)[:, None]).clamp_(-127, 127)
    return q.to(torch.int8), scale


def int8_rowwise_dequantize(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``q · scale`` per row, in ``dtype``."""
    return (q.float() * scale.float()[:, None]).to(dtype)
