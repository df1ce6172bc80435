"""Options of the chunked path beyond the plain output: the linear-share diagnostic, the output dtype, bf16
inputs (fp32 accumulation), grouped-query keys read without repeating them, and grouped feature maps."""

import pytest
import torch

from lolcats.runtime.feature_maps import FEATURE_MAPS, make_feature_map
from lolcats.runtime.ops import Window, expand_heads, hybrid_attention_chunked, hybrid_attention_reference, hybrid_attention_weights


def inputs(batch=2, heads=6, kv_heads=2, length=45, dim=8, features=12, dtype=torch.float32):
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(batch, h, length, dim, generator=generator) for h in (heads, kv_heads, kv_heads))
    fq = torch.softmax(torch.randn(batch, heads, length, features, generator=generator), -1)
    fk = torch.softmax(torch.randn(batch, heads, length, features, generator=generator), -1)
    gamma = torch.rand(heads, generator=generator) * 0.9 + 0.05
    return q.to(dtype), k.to(dtype), v.to(dtype), fq, fk, gamma


@pytest.mark.parametrize("window", [Window("terrace", 4), Window("sliding", 5), Window("none")])
@pytest.mark.parametrize("chunk_size", [4, 6])
def test_linear_share_equals_the_quadratic_weights(window, chunk_size):
    q, k, v, fq, fk, gamma = inputs()
    start = torch.tensor([0, 7])
    out, share = hybrid_attention_chunked(q, k, v, fq, fk, window=window, scaling=0.3, gamma=gamma, start=start,
                                          chunk_size=chunk_size, return_linear_share=True)
    _, linear_part = hybrid_attention_weights(q, k, fq, fk, window=window, scaling=0.3, gamma=gamma, start=start)
    expected = linear_part.sum(-1)
    expected[1, :, :7] = 0  # padding queries
    torch.testing.assert_close(share, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out, hybrid_attention_chunked(q, k, v, fq, fk, window=window, scaling=0.3, gamma=gamma,
                                                             start=start, chunk_size=chunk_size))
    assert share.shape == (2, 6, 45) and bool(((share >= 0) & (share <= 1 + 1e-6)).all())


def test_bf16_inputs_accumulate_in_fp32_and_output_dtype_is_chosen():
    q, k, v, fq, fk, gamma = inputs(dtype=torch.bfloat16)
    window = Window("terrace", 4)
    expected = hybrid_attention_reference(q.float(), k.float(), v.float(), fq, fk, window=window, scaling=0.3, gamma=gamma)
    out = hybrid_attention_chunked(q, k, v, fq, fk, window=window, scaling=0.3, gamma=gamma, chunk_size=4)
    wide = hybrid_attention_chunked(q, k, v, fq, fk, window=window, scaling=0.3, gamma=gamma, chunk_size=4,
                                    output_dtype=torch.float32)
    assert out.dtype == torch.bfloat16 and wide.dtype == torch.float32
    # From the same bf16 inputs, fp32 accumulation gives the fp32 reference up to accumulation order only.
    torch.testing.assert_close(wide, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out, expected.to(torch.bfloat16))


def test_grouped_query_keys_are_never_repeated(monkeypatch):
    """The chunked path reads K/V per kv head: expand_heads is not called, and the result is the reference's."""
    import lolcats.runtime.ops_chunked as chunked

    q, k, v, fq, fk, gamma = inputs()
    window = Window("terrace", 4)
    expected = hybrid_attention_reference(q, k, v, fq, fk, window=window, scaling=0.3, gamma=gamma)
    assert not hasattr(chunked, "expand_heads")  # nothing to call that would repeat them
    out = hybrid_attention_chunked(q, k, v, fq, fk, window=window, scaling=0.3, gamma=gamma, chunk_size=4)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", sorted(FEATURE_MAPS))
def test_feature_maps_read_grouped_keys_like_repeated_keys(name):
    feature_map = make_feature_map(name, num_heads=6, head_dim=8, feature_dim=8, scaling=8**-0.5)
    with torch.no_grad():
        for p in feature_map.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
    keys = torch.randn(2, 2, 5, 8)
    torch.testing.assert_close(feature_map(keys), feature_map(expand_heads(keys, 6)))
    with pytest.raises(ValueError, match="built for 6 heads got 4"):
        feature_map(torch.randn(2, 4, 5, 8))
