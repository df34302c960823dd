import pytest
import torch

import unet


def test_paper_cifar10_parameter_count():
    # Ho et al.'s CIFAR-10 network as converted to diffusers' google/ddpm-cifar10-32 has exactly this many
    assert sum(p.numel() for p in unet.UNet().parameters()) == 35_746_307


@pytest.mark.parametrize("channels,size", [(1, (16, 16)), (3, (16, 16)), (3, (16, 32)), (1, (32, 16))])
def test_output_shape(channels, size):
    m = unet.UNet(**unet.model_config("tiny", size, channels))
    x = torch.randn(2, channels, *size)
    assert m(x, torch.tensor([0, 999])).shape == x.shape


def test_class_embedding_and_null_label():
    m = unet.UNet(**unet.model_config("tiny", (16, 16), 1, num_classes=3))
    for conv in m.modules():  # the last convolutions start at zero by design; wake them up
        if isinstance(conv, torch.nn.Conv2d):
            torch.nn.init.normal_(conv.weight, std=0.05)
    x, t = torch.randn(2, 1, 16, 16), torch.tensor([5, 5])
    null = m(x, t, torch.tensor([-1, -1]))
    torch.testing.assert_close(m(x, t), null)  # no labels means the null label
    assert not torch.allclose(m(x, t, torch.tensor([0, 2])), null)


def test_size_the_network_cannot_divide_names_the_nearest_sizes():
    with pytest.raises(ValueError, match="nearest sizes that work: 24 or 32"):
        unet.UNet(image_size=(28, 28))


def test_paper_network_grows_with_the_image():
    assert unet.model_config("paper", (32, 32), 3)["ch_mult"] == (1, 2, 2, 2)
    assert unet.model_config("paper", (256, 256), 3)["ch_mult"] == (1, 1, 2, 2, 4, 4)


def test_attention_is_single_head_softmax_of_q_k_over_sqrt_c():
    torch.manual_seed(0)
    block = unet.AttnBlock(32)
    torch.nn.init.normal_(block.proj_out.weight, std=0.1)  # zero at init by design
    x = torch.randn(2, 32, 3, 5)  # non-square, so a swapped h and w would show
    h = block.norm(x).flatten(2).transpose(1, 2)  # [n, h*w, c]
    q, k, v = (h @ w.T + b for w, b in zip(block.qkv.weight.chunk(3), block.qkv.bias.chunk(3)))
    a = torch.softmax(q @ k.transpose(1, 2) / 32 ** 0.5, dim=-1) @ v
    expected = x + (a @ block.proj_out.weight.T + block.proj_out.bias).transpose(1, 2).reshape(x.shape)
    torch.testing.assert_close(block(x), expected)


def test_checkpoints_with_attention_as_1x1_convolutions_still_load():
    torch.manual_seed(0)
    m = unet.UNet(**unet.model_config("tiny", (16, 16), 1))
    for p in m.parameters():
        torch.nn.init.normal_(p, std=0.05)
    old = {k: v[..., None, None] if k.endswith(("qkv.weight", "proj_out.weight")) else v for k, v in m.state_dict().items()}
    assert sum(v.ndim == 4 and v.shape[-1] == 1 for k, v in old.items() if "attn" in k) == 8  # 4 blocks x 2
    loaded = unet.UNet(**unet.model_config("tiny", (16, 16), 1))
    loaded.load_state_dict(old)
    x, t = torch.randn(2, 1, 16, 16), torch.tensor([3, 700])
    torch.testing.assert_close(loaded(x, t), m(x, t), rtol=0, atol=0)
