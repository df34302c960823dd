import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F

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
    torch.testing.assert_close(m(x, t, torch.tensor([-1, -1], dtype=torch.int16)), null)  # any integer type
    for y in (3, -2):  # 1-based labels, say: never silently the null label
        with pytest.raises(ValueError, match=r"labels y must be in \[0, 3\) or -1"):
            m(x, t, torch.tensor([0, y]))
    torch.testing.assert_close(m(x, t, 2), m(x, t, torch.tensor([2, 2])))  # one label for all, as guidance gives
    for y in ([0.0, 1.7], [True, False], [[0], [2]], [0, 1, 2]):  # never truncated to a class, bools taken as 0
        with pytest.raises(ValueError, match="labels y must be integers, one per image or one for all"):  # and 1,
            m(x, t, torch.tensor(y))  # nor broadcast to another shape
    with pytest.raises(ValueError, match=re.escape("x must be [N, C, H, W] and t [N] timesteps, not [1, 16, 16]")):
        m(x[0], t[:1])  # one image without its batch dimension


@pytest.mark.parametrize("kwargs", [dict(ch=48), dict(ch=16, ch_mult=(2, 2)), dict(ch_mult=()), dict(ch_mult=(1, 1.5)),
                                    dict(num_classes=-1), dict(ch_mult=(1, 2.0)), dict(ch=32.0), dict(num_classes=2.0)])
def test_a_network_that_cannot_be_built_says_why(kwargs):
    with pytest.raises(ValueError, match="multiples of 32|must be integers"):
        unet.UNet(**{"ch": 32, "ch_mult": (1, 2), "image_size": (8, 8), **kwargs})


@pytest.mark.parametrize("ch_mult", [np.array([1, 2], np.uint8), torch.tensor([1, 2]), [np.int64(1), 2]])
def test_any_integer_sequence_is_a_ch_mult(ch_mult):  # a uint8's products would wrap: 128 x 2 = 0
    counts = [sum(p.numel() for p in unet.UNet(ch=128, ch_mult=m, image_size=(8, 8)).parameters())
              for m in (ch_mult, (1, 2))]
    assert counts[0] == counts[1]


def test_size_the_network_cannot_divide_names_the_nearest_sizes():
    with pytest.raises(ValueError, match="nearest sizes that work: 24 or 32"):
        unet.UNet(image_size=(28, 28))


def test_paper_network_grows_with_the_image():
    assert unet.model_config("paper", (32, 32), 3)["ch_mult"] == (1, 2, 2, 2)
    assert unet.model_config("paper", (256, 256), 3)["ch_mult"] == (1, 1, 2, 2, 4, 4)


# size: (H, W) of the level with attention (2 down + 3 up blocks), (H, W) of the middle block; worked out by
# hand from the paper network's levels, e.g. 48 -> ch_mult 1,2,3,4 -> levels 48, 24, 12, 6: 12 is 1.33x from
# 16 and 24 is 1.5x. Sizes 24, 48, 96, 192 and 48x80 had only the middle block's attention before.
ATTENTION = {(16, 16): ((16, 16), (2, 2)), (24, 24): ((12, 12), (3, 3)), (32, 32): ((16, 16), (4, 4)),
             (48, 48): ((12, 12), (6, 6)), (64, 64): ((16, 16), (8, 8)), (96, 96): ((12, 12), (6, 6)),
             (128, 128): ((16, 16), (8, 8)), (192, 192): ((12, 12), (6, 6)), (256, 256): ((16, 16), (8, 8)),
             (32, 64): ((16, 32), (4, 8)), (48, 80): ((12, 20), (6, 10))}


@pytest.mark.parametrize("size", ATTENTION, ids=lambda s: f"{s[0]}x{s[1]}")
def test_paper_network_attends_at_the_level_nearest_16(size):
    cfg = dict(unet.model_config("paper", size, 3), ch=32)  # the paper's module tree, fewer channels
    m = unet.UNet(**cfg)
    where = []  # (H, W) of each attention block in the tree: down.L / up.L run at size / 2^L, mid at the bottom
    for name, block in m.named_modules():
        if isinstance(block, unet.AttnBlock):
            level = len(cfg["ch_mult"]) - 1 if name == "mid.attn_1" else int(name.split(".")[1])
            where.append((size[0] // 2 ** level, size[1] // 2 ** level))
    level, middle = ATTENTION[size]
    assert sorted(where) == sorted([level] * 5 + [middle])  # 6 blocks, counting the middle one
    assert m.attn_sizes == [level]


@pytest.mark.parametrize("size", [(24, 24), (48, 80)], ids=["24x24", "48x80"])
def test_attention_runs_at_the_listed_size(size):
    m = unet.UNet(**dict(unet.model_config("paper", size, 3), ch=32))
    seen = []
    for block in m.modules():
        if isinstance(block, unet.AttnBlock):
            block.register_forward_hook(lambda mod, inputs, out: seen.append(tuple(inputs[0].shape[2:])))
    with torch.no_grad():
        m(torch.zeros(1, 3, *size), torch.tensor([10]))
    assert sorted(seen) == sorted(m.attn_sizes * 5 + [ATTENTION[size][1]])


def test_attention_level_is_nearest_by_ratio():
    assert unet.attention_levels((22, 22), (1, 2)) == [0]  # 22 is 1.375x from 16, 11 is 1.45x (by difference: 11)
    assert unet.attention_levels((32, 32), (1, 2, 2, 2), attn_res=(16, 8)) == [1, 2]
    assert unet.attention_levels((256, 256), (1, 2, 2)) == [2]  # the bottom, 64x64, is the nearest there is


@pytest.mark.parametrize("size,level", [(32, 1), (64, 2), (128, 3), (256, 4)])
def test_attention_weights_keep_their_names_at_the_paper_sizes(size, level):
    """Checkpoints written before the nearest-level rule must still load: at these sizes one level is 16x16,
    and attention sits there, under the same names."""
    m = unet.UNet(**dict(unet.model_config("paper", (size, size), 3), ch=32))
    names = {name for name, mod in m.named_modules() if isinstance(mod, unet.AttnBlock)}
    expected = {f"down.{level}.attn.{i}" for i in range(2)} | {f"up.{level}.attn.{i}" for i in range(3)}
    assert names == expected | {"mid.attn_1"}


def test_paper_recipe_per_size_in_the_saved_config():
    """lr and batch (train.py's defaults) and dropout (the network's) follow Ho et al. at 32 and 256 and
    Nichol & Dhariwal's ImageNet 64x64 recipe at 64 and 128; sizes between take the nearest."""
    import train

    expected = {"32": (2e-4, 128, 0.1), "64": (1e-4, 128, 0.0), "128": (1e-4, 128, 0.0), "256": (2e-5, 64, 0.0),
                "48x80": (1e-4, 128, 0.0), "24": (2e-4, 128, 0.1), "192": (2e-5, 64, 0.0)}
    for size, (lr, batch, dropout) in expected.items():
        args, *_ = train.parse_args(["--size", size])
        mcfg = unet.model_config(args.model, train.parse_size(size), 3)
        assert (args.lr, args.batch, mcfg["dropout"]) == (lr, batch, dropout), size
    args, *_ = train.parse_args(["--size", "256", "--lr", "1e-3", "--batch", "8"])  # flags still win
    assert (args.lr, args.batch) == (1e-3, 8)
    args, *_ = train.parse_args(["--size", "256", "--model", "tiny"])  # the CPU presets do not change with size
    assert (args.lr, args.batch, unet.model_config("tiny", (256, 256), 3)["dropout"]) == (2e-3, 32, 0.0)


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


def test_norm_groups_sets_every_groupnorm_and_a_config_without_it_has_the_papers_32():
    """Wu & He 2018: a group of one channel (32 groups at tiny's 32 channels) normalises worst; norm_groups sets them
    all, and a checkpoint written before the setting existed (no key) builds the 32 it was trained with."""
    groups = lambda m: {g.num_groups for g in m.modules() if isinstance(g, torch.nn.GroupNorm)}
    tiny = unet.model_config("tiny", (16, 16), 3)
    assert tiny["norm_groups"] == 8 and groups(unet.UNet(**tiny)) == {8}  # the CPU presets' (docs/benchmarks.md)
    assert groups(unet.UNet(**unet.model_config("tiny", (16, 16), 3, norm_groups=2))) == {2}
    assert groups(unet.UNet(**unet.model_config("paper", (32, 32), 3))) == {32}
    del tiny["norm_groups"]  # a checkpoint of the tiny preset written before it had 8
    assert groups(unet.UNet(**tiny)) == {32}
    with pytest.raises(ValueError, match="norm_groups 64"):
        unet.UNet(ch=32, ch_mult=(1, 2), image_size=(16, 16), norm_groups=64)


def test_scale_shift_is_adagn_in_every_resnet_block_and_off_without_the_key():
    """Dhariwal & Nichol 2021, sec. 3: AdaGN(h, y) = y_s GroupNorm(h) + y_b with [y_s - 1, y_b] the projected timestep
    embedding, the CPU presets' (docs/benchmarks.md#quality2); without the setting (the paper's, and every config
    written before it) the embedding is added."""
    cfg = unet.model_config("tiny", (8, 8), 1)
    blocks = [m for m in unet.UNet(**cfg).modules() if isinstance(m, unet.ResnetBlock)]
    assert blocks and all(b.scale_shift and b.temb_proj.out_features == 2 * b.conv1.out_channels for b in blocks)
    del cfg["scale_shift"]  # a checkpoint of the tiny preset written before it had AdaGN
    assert not any(m.scale_shift for m in unet.UNet(**cfg).modules() if isinstance(m, unet.ResnetBlock))
    assert not unet.model_config("paper", (32, 32), 3)["scale_shift"]
    torch.manual_seed(0)
    block, x, temb = unet.ResnetBlock(32, 64, 16, 0.0, 8, scale_shift=True), torch.randn(2, 32, 4, 4), torch.randn(2, 16)
    for p in block.parameters():
        torch.nn.init.normal_(p, 0, 0.3)  # conv2 starts at zero: the residual branch would hide the formula
    scale, shift = block.temb_proj(F.silu(temb))[:, :, None, None].chunk(2, dim=1)
    h = block.norm2(block.conv1(F.silu(block.norm1(x)))) * (1 + scale) + shift
    torch.testing.assert_close(block(x, temb), block.nin_shortcut(x) + block.conv2(F.silu(h)))
