"""The packing contract: bit streams, GPTQ and AWQ layouts round-trip, and match known layouts."""

import pytest
import torch

from auto_quant.export import packing


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 8])
@pytest.mark.parametrize("n", [1, 7, 32, 100, 256])
def test_bitstream_roundtrip(bits, n):
    x = torch.randint(0, 2**bits, (3, n))
    p = packing.pack_bitstream(x, bits, dim=1)
    assert p.dtype == torch.int32 and p.shape == (3, packing.packed_length(n, bits))
    assert torch.equal(packing.unpack_bitstream(p, bits, n, dim=1), x.int())
    p0 = packing.pack_bitstream(x.t(), bits, dim=0)
    assert torch.equal(packing.unpack_bitstream(p0, bits, n, dim=0), x.t().int())


def test_bitstream_is_classic_gptq_for_4_bits():
    x = torch.arange(8).reshape(1, 8)
    word = packing.pack_bitstream(x, 4, dim=1)[0, 0].item() & 0xFFFFFFFF
    assert word == sum(v << (4 * j) for j, v in enumerate(range(8)))


def test_bitstream_3bit_straddles_words_like_gptq():
    x = torch.zeros(1, 32, dtype=torch.long)
    x[0, 10] = 0b111  # bits 30..32 of the stream: two bits in word 0, one in word 1
    p = packing.pack_bitstream(x, 3, dim=1)[0].to(torch.int64) & 0xFFFFFFFF
    assert p[0].item() == 0b11 << 30 and p[1].item() == 1 and p[2].item() == 0


@pytest.mark.parametrize("offset", [0, -1])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_gptq_roundtrip(bits, offset):
    out_f, in_f, gs = 48, 96, 32
    codes = torch.randint(0, 2**bits, (out_f, in_f))
    zero = torch.randint(1, 2**bits, (out_f, in_f // gs))
    scale = torch.rand(out_f, in_f // gs) - 0.5
    t = packing.pack_gptq(codes, zero, scale, bits, offset)
    assert t["qweight"].shape == (in_f * bits // 32, out_f)
    c, z, s = packing.unpack_gptq(t["qweight"], t["qzeros"], t["scales"], bits, in_f, out_f, offset)
    assert torch.equal(c, codes.int()) and torch.equal(z, zero.int())
    assert torch.allclose(s.float(), scale.half().float())


@pytest.mark.parametrize("offset", [0, -1])
@pytest.mark.parametrize("bits,in_f,gs", [(2, 96, 32), (4, 96, 32), (4, 128, -1), (4, 100, 32), (8, 64, 16),
                                          (3, 96, 32)])
def test_dequantize_gptq_equals_unpacked_codes(bits, in_f, gs, offset):
    """The fast per-word dequantization (2/4/8 bits) and the generic one (3 bits, padded last groups) give the
    float weight of the unpacked codes exactly, in float32 and after the cast to half precision."""
    out_f = 40
    g = in_f if gs == -1 else gs
    n_groups = -(-in_f // g)
    codes = torch.randint(0, 2**bits, (out_f, in_f))
    zero = torch.randint(1, 2**bits, (out_f, n_groups))
    scale = torch.rand(out_f, n_groups) - 0.5
    t = packing.pack_gptq(codes, zero, scale, bits, offset)
    idx = torch.arange(in_f) // g
    want = (codes.float() - zero.float()[:, idx]) * scale.half().float()[:, idx]
    for dtype in (torch.float32, torch.bfloat16):
        got = packing.dequantize_gptq(t["qweight"], t["qzeros"], t["scales"], bits, in_f, out_f, gs, offset, dtype)
        assert got.shape == (out_f, in_f) and got.is_contiguous() and torch.equal(got, want.to(dtype))


def test_gptq_legacy_refuses_zero_of_zero():
    with pytest.raises(ValueError, match="zero-1"):
        packing.pack_gptq(torch.zeros(8, 32, dtype=torch.long), torch.zeros(8, 1, dtype=torch.long), torch.ones(8, 1), 4, -1)


def test_awq_roundtrip_and_interleave():
    out_f, in_f = 16, 64
    codes = torch.randint(0, 16, (out_f, in_f))
    zero = torch.randint(0, 16, (out_f, 2))
    t = packing.pack_awq(codes, zero, torch.rand(out_f, 2))
    assert t["qweight"].shape == (in_f, out_f // 8)
    c, z, _ = packing.unpack_awq(t["qweight"], t["qzeros"], t["scales"], in_f, out_f)
    assert torch.equal(c, codes.int()) and torch.equal(z, zero.int())
    # slot 1 of the first word holds output column 2 (AWQ order 0,2,4,6,1,3,5,7)
    word = t["qweight"][0, 0].item() & 0xFFFFFFFF
    assert (word >> 4) & 0xF == codes[2, 0].item()


def test_matches_auto_round_bitstream_when_installed():
    bp = pytest.importorskip("auto_round.utils.bit_packing")
    for bits in (2, 3, 4, 5, 6, 8):
        x = torch.randint(0, 2**bits, (4, 64))
        assert torch.equal(bp.pack_bitstream(x, bits, dim=1).int(), packing.pack_bitstream(x, bits, dim=1))
