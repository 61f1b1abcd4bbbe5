"""Quantization primitives: packing round trips, error bounds, double quantization, NF4, padding."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from passes import quant_formats as qf


def sqnr_db(ref: torch.Tensor, out: torch.Tensor) -> float:
    return (10 * torch.log10(ref.pow(2).sum() / (ref - out).pow(2).sum())).item()


def _gaussian(rows: int = 576, cols: int = 1536, seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed))


@settings(max_examples=60, deadline=None)
@given(bits=st.sampled_from(qf.PACK_BITS), numel=st.integers(0, 300), seed=st.integers(0, 2**16))
def test_pack_unpack_round_trip(bits, numel, seed):
    q = torch.randint(0, 2**bits, (numel,), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))
    packed = qf.pack(q, bits)
    assert packed.dtype == torch.uint8 and packed.numel() == qf.packed_nbytes(numel, bits)
    assert packed.numel() == -(-numel * bits // 8) or bits == 3  # int2/int4 waste at most one byte
    assert torch.equal(qf.unpack(packed, bits, numel), q)


@settings(max_examples=30, deadline=None)
@given(
    bits=st.sampled_from(qf.PACK_BITS),
    rows=st.integers(1, 9),
    words=st.integers(1, 6),
    seed=st.integers(0, 2**16),
)
def test_packed_rows_unpack_independently(bits, rows, words, seed):
    # rows of whole packing words (8 codes) can be gathered and unpacked row by row
    q = torch.randint(0, 2**bits, (rows, 8 * words), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))
    packed = qf.pack(q, bits).view(rows, -1)
    assert packed.shape[1] == words * bits
    assert torch.equal(qf.unpack(packed, bits, 8 * words), q)
    pick = torch.tensor([rows - 1, 0, rows // 2])
    assert torch.equal(qf.unpack(packed[pick], bits, 8 * words), q[pick])


def test_pack_layout_is_dense_and_little_endian():
    assert qf.pack(torch.tensor([1, 2], dtype=torch.uint8), 4).tolist() == [0x21]
    assert qf.pack(torch.tensor([1, 2, 3, 0], dtype=torch.uint8), 2).tolist() == [0b00111001]
    # int3: eight values in three bytes, value i at bits 3i … 3i+2 of a 24-bit word
    q = torch.tensor([7, 0, 0, 0, 0, 0, 0, 5], dtype=torch.uint8)
    assert qf.pack(q, 3).tolist() == [7, 0, 5 << 5]


def test_pack_rejects_bad_input():
    with pytest.raises(ValueError, match=r"\(2, 3, 4\)"):
        qf.pack(torch.zeros(8, dtype=torch.uint8), 5)
    with pytest.raises(TypeError, match="uint8"):
        qf.pack(torch.zeros(8, dtype=torch.int32), 4)


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("group_size, cols", [(32, 100), (64, 576), (128, 576)])
def test_round_to_nearest_error_is_at_most_half_a_step(bits, group_size, cols):
    w = _gaussian(40, cols, seed=bits)
    q, scale, minimum = qf.quantize_groups(w, bits, group_size)
    assert q.shape == (40, qf.padded_columns(cols, group_size)) and int(q.max()) < 2**bits
    back = qf.dequantize_groups(q, scale, minimum, cols)
    assert back.shape == w.shape
    step = scale.repeat_interleave(group_size, 1)[:, :cols]
    # exact fp32 constants: |err| <= scale/2, up to fp32 rounding of (w - min)/scale
    assert ((w - back).abs() <= step / 2 * (1 + 1e-5) + 1e-6).all()


def test_padding_when_the_group_does_not_divide_the_input():
    w = _gaussian(8, 576, seed=1).abs() + 1.0  # all positive: the padded zeros widen the last group's range
    q, scale, minimum = qf.quantize_groups(w, 4, 128)
    assert q.shape == (8, 640) and scale.shape == (8, 5)
    assert torch.all(minimum[:, -1] == 0) and torch.all(minimum[:, :-1] > 0)
    assert torch.all(q[:, 576:] == 0)  # zero is the minimum of the last group: code 0
    back = qf.dequantize_groups(q, scale, minimum)
    assert back.shape == (8, 640) and torch.all(back[:, 576:] == 0)
    nq, absmax = qf.nf4_quantize(w, 128)
    assert nq.shape == (8, 640) and torch.all(qf.NF4_CODEBOOK[nq[:, 576:].long()] == 0)
    assert qf.nf4_dequantize(nq, absmax, 576).shape == (8, 576)


def test_stated_sqnr_on_a_gaussian_matrix():
    """The SQNRs the config docstrings state (fp32 constants here; fp16 ones are within 0.01 dB)."""
    w = _gaussian()
    measured = {
        "int8": sqnr_db(w, qf.int8_rowwise_dequantize(*qf.int8_rowwise(w))),
        "int4 g64": sqnr_db(w, qf.dequantize_groups(*qf.quantize_groups(w, 4, 64))),
        "int3 g64": sqnr_db(w, qf.dequantize_groups(*qf.quantize_groups(w, 3, 64))),
        "int2 g64": sqnr_db(w, qf.dequantize_groups(*qf.quantize_groups(w, 2, 64))),
        "nf4 g64": sqnr_db(w, qf.nf4_dequantize(*qf.nf4_quantize(w, 64))),
    }
    assert measured["int8"] > 41.5  # measured 41.8 dB
    assert measured["int4 g64"] > 20.8  # measured 20.96 dB
    assert measured["int3 g64"] > 14.1  # measured 14.33 dB
    assert measured["int2 g64"] > 6.7  # measured 6.94 dB
    assert measured["nf4 g64"] > 20.5  # measured 20.73 dB


def test_int8_rowwise():
    w = _gaussian(16, 100, seed=2)
    q, scale = qf.int8_rowwise(w)
    assert q.dtype == torch.int8 and int(q.abs().max()) == 127 and scale.shape == (16,)
    assert ((w - qf.int8_rowwise_dequantize(q, scale)).abs() <= scale[:, None] / 2 * (1 + 1e-5)).all()
    zero = qf.int8_rowwise(torch.zeros(2, 5))[0]
    assert torch.all(zero == 0)


@pytest.mark.parametrize("numel", [1, 256, 1000])  # 1000: a ragged last block
def test_double_quant_constants_are_close_to_the_originals(numel):
    x = _gaussian(1, numel, seed=3).reshape(-1).abs() * 0.02 + 1e-3  # scale-like positive values
    codes, blocks = qf.quantize_constants(x)
    assert codes.dtype == torch.uint8 and codes.shape == x.shape
    assert blocks.dtype == torch.float32 and blocks.shape == (-(-numel // 256), 2)
    back = qf.dequantize_constants(codes, blocks)
    for b in range(blocks.shape[0]):
        part = slice(256 * b, 256 * (b + 1))
        half_step = (x[part].max() - x[part].min()) / 510
        assert ((x[part] - back[part]).abs() <= half_step * (1 + 1e-4) + 1e-9).all()


def test_nf4_codebook():
    book = qf.NF4_CODEBOOK
    assert book.shape == (16,) and torch.all(book[1:] > book[:-1])
    assert book[0] == -1 and book[-1] == 1 and (book == 0).sum() == 1
    # QLoRA's construction (bitsandbytes create_normal_map, offset 0.9677083): normal quantiles
    offset = 0.9677083
    pos = torch.special.ndtri(torch.linspace(offset, 0.5, 9, dtype=torch.float64)[:-1])
    neg = -torch.special.ndtri(torch.linspace(offset, 0.5, 8, dtype=torch.float64)[:-1])
    values = torch.cat([pos, torch.zeros(1, dtype=torch.float64), neg]).sort().values
    torch.testing.assert_close(book.double(), values / values.abs().max(), rtol=0, atol=1e-6)


def test_nf4_picks_the_nearest_code():
    w = _gaussian(12, 96, seed=4)
    q, absmax = qf.nf4_quantize(w, 32)
    normalised = w.view(12, 3, 32) / absmax[..., None]
    nearest = (normalised[..., None] - qf.NF4_CODEBOOK).abs().argmin(-1)
    assert torch.equal(q.view(12, 3, 32).long(), nearest)
    assert torch.equal(absmax, w.view(12, 3, 32).abs().amax(-1))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_math_in_fp32_output_in_the_weight_dtype(dtype):
    w = _gaussian(8, 64, seed=5).to(dtype)
    q, scale, minimum = qf.quantize_groups(w, 4, 32)
    assert scale.dtype == torch.float32
    back = qf.dequantize_groups(q, scale, minimum, 64, dtype)
    assert back.dtype == dtype
    assert sqnr_db(w.float(), back.float()) > 20  # int4 g32 on Gaussian: 22 dB (bf16 output rounding costs little)
    assert qf.nf4_dequantize(*qf.nf4_quantize(w, 32), 64, dtype).dtype == dtype
