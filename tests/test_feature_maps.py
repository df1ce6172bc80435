import pytest
import torch

from lolcats.runtime.feature_maps import FEATURE_MAPS, make_feature_map


@pytest.mark.parametrize("name", sorted(FEATURE_MAPS))
@pytest.mark.parametrize("head_dim", [8, 64, 256])
def test_shapes_and_positive_kernel(name, head_dim):
    feature_map = make_feature_map(name, num_heads=3, head_dim=head_dim, feature_dim=64, scaling=head_dim**-0.5)
    x = torch.randn(2, 3, 5, head_dim)
    features = feature_map(x)
    assert features.shape == (2, 3, 5, feature_map.output_dim) and features.dtype == torch.float32
    kernel = features @ feature_map(torch.randn(2, 3, 7, head_dim)).transpose(-1, -2)
    assert (kernel >= 0).all()


def test_hedgehog_is_two_softmaxes_of_an_identity_projection():
    feature_map = make_feature_map("hedgehog", num_heads=2, head_dim=8, feature_dim=64, scaling=1.0)
    assert feature_map.weight.shape == (2, 8, 64) and feature_map.output_dim == 128
    x = torch.randn(1, 2, 4, 8)
    padded = torch.cat([x, torch.zeros(1, 2, 4, 56)], dim=-1)  # identity padded from 8 to 64 columns
    expected = torch.cat([padded.softmax(-1), (-padded).softmax(-1)], dim=-1)
    torch.testing.assert_close(feature_map(x), expected)
    wide = make_feature_map("hedgehog", num_heads=1, head_dim=256, feature_dim=64, scaling=1.0)
    torch.testing.assert_close(wide.weight[0], torch.eye(256, 64))  # truncated identity


def test_taylor_kernel_is_second_order_exp():
    scaling = 0.125
    feature_map = make_feature_map("taylor", num_heads=1, head_dim=64, feature_dim=64, scaling=scaling)
    assert feature_map.output_dim == 1 + 16 + 256
    q, k = torch.randn(1, 1, 3, 64), torch.randn(1, 1, 3, 64)
    dot = (q[..., :16] @ k[..., :16].transpose(-1, -2)) * scaling  # identity projection keeps 16 dims
    torch.testing.assert_close(feature_map(q) @ feature_map(k).transpose(-1, -2), 1 + dot + dot**2 / 2)


def test_t2r_and_elu():
    t2r = make_feature_map("t2r", num_heads=1, head_dim=4, feature_dim=4, scaling=1.0)
    x = torch.randn(1, 1, 3, 4)
    torch.testing.assert_close(t2r(x), x.relu())
    elu = make_feature_map("elu", num_heads=1, head_dim=4, feature_dim=4, scaling=1.0)
    torch.testing.assert_close(elu(x), 1 + torch.nn.functional.elu(x))


def test_unknown_feature_map():
    with pytest.raises(ValueError, match="unknown feature map 'cosformer'; choose one of hedgehog"):
        make_feature_map("cosformer", 1, 8, 8, 1.0)
