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
