"""The noise-prediction network of Ho, Jain & Abbeel (2020), "Denoising Diffusion Probabilistic Models".

A U-Net on the PixelCNN++ backbone (Appendix B): ResNet blocks with GroupNorm and a sinusoidal timestep
embedding added in every block, self-attention at 16x16 (at other sizes: the level nearest 16x16, see
`attention_levels`), dropout, two ResNet blocks per resolution. The constructor's defaults are the paper's
CIFAR-10 network (35.7M parameters). Module names follow the paper's code as ported by pesser/pytorch_diffusion
(`down[i].block[j]`, `mid.attn_1`, `norm_out`), though its checkpoints do not load here: attention's q, k, v are
one layer and the timestep MLP is a Sequential. Depends on torch only.

    model = UNet(in_ch=3, image_size=(32, 32))
    eps = model(x_t, t)          # x_t [N, C, H, W], t [N] integer timesteps in [0, T)
    eps = model(x_t, t, y)       # with num_classes > 0: y [N] labels, -1 meaning the null label
"""
import math
import operator

import torch
import torch.nn as nn
import torch.nn.functional as F

# A preset is a network and its training recipe (train.py's defaults). The paper's grows with the image, per the
# size nearest the shorter side (paper_size). Ho et al., Appendix B: 32x32 and 256x256; dropout 0.1 on CIFAR-10,
# "zero without sweeping" on the others; lr 2e-4, "lowered it to 2e-5 for the 256x256 images, which seemed unstable
# to train with the larger learning rate"; "batch size to 128 for CIFAR10 and 64 for larger images". 64 and 128
# follow Nichol & Dhariwal 2021 (ch_mult; lr, batch, dropout of their ImageNet 64x64 runs), and say so in --help.
PAPER_SIZES = {
    32: dict(ch_mult=(1, 2, 2, 2), dropout=0.1, lr=2e-4, batch=128),
    64: dict(ch_mult=(1, 2, 3, 4), dropout=0.0, lr=1e-4, batch=128),
    128: dict(ch_mult=(1, 1, 2, 3, 4), dropout=0.0, lr=1e-4, batch=128),
    256: dict(ch_mult=(1, 1, 2, 2, 4, 4), dropout=0.0, lr=2e-5, batch=64),
}
# the network's settings in a model_config; the presets set all but attn_res
NETWORK_KEYS = ("ch", "ch_mult", "num_res_blocks", "dropout", "attn_res", "norm_groups", "scale_shift")
ATTN_RES = (16,)  # the paper's: self-attention at 16x16
PRESETS = {
    "paper": dict(ch=128, num_res_blocks=2, norm_groups=32, scale_shift=False, target="eps", schedule="linear",
                  warmup=5000, ema=0.9999, cosine=False, t_density="uniform"),
    # for CPUs, trained for minutes (docs/benchmarks.md, "Choosing the CPU presets"; small shares tiny's recipe, not
    # yet measured): v target (at large t, x_0 = (x_t - sqrt(1 - alpha-bar) eps) / sqrt(alpha-bar) magnifies a young
    # eps net's error ~150x), cosine schedule (fewer near-pure-noise steps at low resolution), lr annealed to --lr-min,
    # GroupNorm of 8 groups (32 at tiny's 32 channels is one channel a group, which Wu & He 2018 found normalises
    # worst; 8 took MNIST's 15-minute FID from 47.8 to 34.8), AdaGN time conditioning (34.8 to 31.4 and 40.9 to
    # 35.1 on two seeds), t drawn so that ln sigma_t ~ N(0, 1.2^2), uniform t's centre without its tails (31.4 to
    # 29.4 and 35.1 to 32.3), and a snapshot at 35% of the run for autoguidance (sample.py --autoguide; 35.3 to
    # 26.4 and 40.9 to 30.2, where a quarter gave 27.5 and 32.5): docs/benchmarks.md#quality3
    "small": dict(ch=64, ch_mult=(1, 2, 2), num_res_blocks=2, dropout=0.1, norm_groups=8, scale_shift=True, target="v",
                  schedule="cosine", lr=1e-3, batch=64, warmup=200, ema=0.999, cosine=True, snapshot=0.35,
                  t_density="0,1.2"),
    "tiny": dict(ch=32, ch_mult=(1, 2, 2), num_res_blocks=1, dropout=0.0, norm_groups=8, scale_shift=True, target="v",
                 schedule="cosine", lr=2e-3, batch=32, warmup=100, ema=0.995, cosine=True, snapshot=0.35,
                 t_density="0,1.2"),
}


def preset(name, image_size):
    """The preset's settings at an image size (H, W): its network keys and its training recipe."""
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; choose one of {', '.join(PRESETS)}")
    return {**PRESETS[name], **(PAPER_SIZES[paper_size(image_size)] if name == "paper" else {})}


def paper_size(image_size):
    """The size in PAPER_SIZES nearest to the shorter side of (H, W) by ratio: 48 -> 64, 24 -> 32."""
    return min(PAPER_SIZES, key=lambda s: abs(math.log2(s / min(image_size))))


def model_config(name, image_size, in_ch, num_classes=0, **network):
    """The UNet keyword arguments for a preset name at an image size (H, W), as plain Python types; `network` (any of
    NETWORK_KEYS, e.g. ch=64, ch_mult=(1, 2, 4, 8), attn_res=()) over the preset's."""
    unknown = set(network) - set(NETWORK_KEYS)
    if unknown:
        raise TypeError(f"model_config: unknown network setting(s) {', '.join(sorted(unknown))}; give any of "
                        f"{', '.join(NETWORK_KEYS)}")
    cfg = {**{k: v for k, v in preset(name, image_size).items() if k in NETWORK_KEYS}, **network}
    cfg.update({k: tuple(cfg[k]) for k in ("ch_mult", "attn_res") if k in cfg})
    return dict(cfg, in_ch=in_ch, image_size=tuple(image_size), num_classes=num_classes)


def attention_levels(image_size, ch_mult, attn_res=ATTN_RES):
    """The levels (0: full size, one per entry of ch_mult) with self-attention: for each side r in attn_res, the
    level whose shorter side is nearest to r by ratio. The paper attends at 16x16 in its 32x32 and 256x256 networks;
    sizes 24, 48, 96 and 192 have levels 24 and 12 (1.5x and 1.33x from 16), so 12. By ratio, as levels are a factor
    2 apart, so the token count H*W (attention's cost) is nearest the paper's too; a tie would need a side r*sqrt(2)."""
    sides = [max(1, min(image_size) // 2 ** level) for level in range(len(ch_mult))]  # 1: too deep, see check_size
    return sorted({min(range(len(sides)), key=lambda i: abs(math.log2(sides[i] / r))) for r in attn_res})


def check_size(image_size, ch_mult):
    """Raise ValueError naming the nearest sizes that work if H or W cannot be halved len(ch_mult)-1 times."""
    if len(image_size) != 2:
        raise ValueError(f"image_size {tuple(image_size)} is not (H, W)")
    factor = 2 ** (len(ch_mult) - 1)
    for side in image_size:
        if side % factor or side < factor:
            lower, upper = max(factor, side // factor * factor), (side // factor + 1) * factor
            raise ValueError(f"size {side} is not divisible by {factor} (the network halves it "
                             f"{len(ch_mult) - 1} times); nearest sizes that work: {lower} or {upper}")


def timestep_embedding(t, dim):
    """Transformer sinusoidal embedding of timesteps, as in the paper's code: t [N] -> [N, dim]."""
    half = dim // 2
    freqs = torch.exp(torch.arange(half, device=t.device, dtype=torch.float32) * -(math.log(10000) / (half - 1)))
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.sin(args), torch.cos(args)], dim=1)


def norm(ch, groups):
    return nn.GroupNorm(groups, ch, eps=1e-6)


class ResnetBlock(nn.Module):
    """Two 3x3 convolutions with GroupNorm and swish; the timestep embedding is added between them, or with
    `scale_shift` scales and shifts the second GroupNorm's output: AdaGN (Dhariwal & Nichol 2021, sec. 3),
    GroupNorm(h) (1 + scale) + shift, as diffusers' resnet_time_scale_shift "scale_shift"."""

    def __init__(self, in_ch, out_ch, temb_ch, dropout, groups=32, scale_shift=False):
        super().__init__()
        self.norm1 = norm(in_ch, groups)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.scale_shift = scale_shift
        self.temb_proj = nn.Linear(temb_ch, 2 * out_ch if scale_shift else out_ch)
        self.norm2 = norm(out_ch, groups)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x, temb):
        h, emb = self.conv1(F.silu(self.norm1(x))), self.temb_proj(F.silu(temb))[:, :, None, None]
        if self.scale_shift:
            scale, shift = emb.chunk(2, dim=1)
            h = self.norm2(h) * (1 + scale) + shift
        else:
            h = self.norm2(h + emb)
        return self.nin_shortcut(x) + self.conv2(self.dropout(F.silu(h)))


class AttnBlock(nn.Module):
    """Single-head self-attention over all H*W positions, with a residual connection."""

    def __init__(self, ch, groups=32):
        super().__init__()
        self.norm = norm(ch, groups)
        self.qkv = nn.Linear(ch, 3 * ch)  # the paper's NIN layers (dense over channels) q, k, v in one
        self.proj_out = nn.Linear(ch, ch)

    def forward(self, x):
        n, c, h, w = x.shape
        tokens = self.norm(x).flatten(2).transpose(1, 2)  # [n, h*w, c]
        # q, k, v [n, 1, h*w, c], each contiguous in c, which lets SDPA take its fused kernel on CPU too
        q, k, v = self.qkv(tokens).unflatten(-1, (3, 1, c)).permute(2, 0, 3, 1, 4).unbind(0)
        a = F.scaled_dot_product_attention(q, k, v)  # softmax(q k^T / sqrt(c)) v
        return x + self.proj_out(a.squeeze(1)).transpose(1, 2).unflatten(2, (h, w))

    def _load_from_state_dict(self, state_dict, prefix, *args):
        # Checkpoints of train.py format 1 hold these dense layers as 1x1 convolutions: same weights, 4-D.
        for name in (prefix + "qkv.weight", prefix + "proj_out.weight"):
            if name in state_dict and state_dict[name].ndim == 4:
                state_dict[name] = state_dict[name].flatten(1)
        super()._load_from_state_dict(state_dict, prefix, *args)


class Resample(nn.Module):
    """Halving (a stride-2 3x3 convolution, padded bottom and right like TensorFlow's 'SAME') or doubling (nearest
    neighbour, then a 3x3 convolution)."""

    def __init__(self, ch, up):
        super().__init__()
        self.up, self.conv = up, nn.Conv2d(ch, ch, 3, stride=1 if up else 2, padding=1 if up else 0)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest") if self.up else F.pad(x, (0, 1, 0, 1)))


class UNet(nn.Module):
    """Ho et al.'s U-Net. Attention goes in the middle block and at the levels nearest each side in `attn_res` (none
    for `()`; `attention_levels` of `image_size` (H, W); `attn_sizes` lists their (H, W)). `num_classes` > 0 adds a class
    embedding with one extra null row, selected by label -1, for classifier-free guidance. `norm_groups`: GroupNorm's
    groups in every block (the paper's 32; a checkpoint's config without the key means 32); `scale_shift`: AdaGN time
    conditioning in every ResNet block (off in the paper and when a config lacks the key)."""

    def __init__(self, in_ch=3, ch=128, ch_mult=(1, 2, 2, 2), num_res_blocks=2, attn_res=ATTN_RES, dropout=0.1,
                 image_size=(32, 32), num_classes=0, norm_groups=32, scale_shift=False):
        super().__init__()
        try:  # numpy's and tensors' integers as Python's (a uint8 ch * mult would wrap); 2.0 is no width
            ch, num_classes, g = operator.index(ch), operator.index(num_classes), operator.index(norm_groups)
            ch_mult = tuple(map(operator.index, ch_mult))
        except TypeError:
            raise ValueError(f"ch {ch!r}, ch_mult {ch_mult!r}, num_classes {num_classes!r}, norm_groups "
                             f"{norm_groups!r}: must be integers") from None
        check_size(image_size, ch_mult)
        widths = (ch, *(ch * m for m in ch_mult))
        if num_classes < 0 or not ch_mult or g < 1 or any(w < 32 or w % 32 or w % g for w in widths):
            raise ValueError(f"ch {ch} and ch times each ch_mult {ch_mult} must be multiples of 32 and of norm_groups "
                             f"{norm_groups} (GroupNorm's groups), num_classes >= 0 (got {num_classes})")
        self.ch, self.num_classes, adagn = ch, num_classes, bool(scale_shift)
        attn_levels = attention_levels(image_size, ch_mult, attn_res)
        self.attn_sizes = [(image_size[0] // 2 ** level, image_size[1] // 2 ** level) for level in attn_levels]
        temb_ch = 4 * ch
        self.temb = nn.Sequential(nn.Linear(ch, temb_ch), nn.SiLU(), nn.Linear(temb_ch, temb_ch))
        self.class_emb = nn.Embedding(num_classes + 1, temb_ch) if num_classes else None
        self.conv_in = nn.Conv2d(in_ch, ch, 3, padding=1)
        skip_chs, block_in = [ch], ch
        self.down = nn.ModuleList()
        for level, mult in enumerate(ch_mult):
            down = nn.Module()
            down.block, down.attn = nn.ModuleList(), nn.ModuleList()
            for _ in range(num_res_blocks):
                down.block.append(ResnetBlock(block_in, ch * mult, temb_ch, dropout, g, adagn))
                block_in = ch * mult
                down.attn.append(AttnBlock(block_in, g) if level in attn_levels else nn.Identity())
                skip_chs.append(block_in)
            if level != len(ch_mult) - 1:
                down.downsample = Resample(block_in, up=False)
                skip_chs.append(block_in)
            self.down.append(down)
        self.mid = nn.Module()
        self.mid.block_1 = ResnetBlock(block_in, block_in, temb_ch, dropout, g, adagn)
        self.mid.attn_1 = AttnBlock(block_in, g)
        self.mid.block_2 = ResnetBlock(block_in, block_in, temb_ch, dropout, g, adagn)
        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(ch_mult))):
            up = nn.Module()
            up.block, up.attn = nn.ModuleList(), nn.ModuleList()
            for _ in range(num_res_blocks + 1):
                up.block.append(ResnetBlock(block_in + skip_chs.pop(), ch * mult, temb_ch, dropout, g, adagn))
                block_in = ch * mult
                up.attn.append(AttnBlock(block_in, g) if level in attn_levels else nn.Identity())
            if level != 0:
                up.upsample = Resample(block_in, up=True)
            self.up.insert(0, up)  # stored in resolution order, like the down path
        self.norm_out = norm(block_in, g)
        self.conv_out = nn.Conv2d(block_in, in_ch, 3, padding=1)
        self._init_weights()

    def _init_weights(self):
        # The paper's code: Xavier-uniform ("fan_avg") weights, zero biases, and zero-initialised final
        # convolutions in every residual branch and at the output, so each block starts as the identity.
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        for m in self.modules():
            if isinstance(m, ResnetBlock):
                nn.init.zeros_(m.conv2.weight)
            elif isinstance(m, AttnBlock):
                for w in m.qkv.weight.detach().chunk(3):  # q, k, v are three layers there: fan_avg of each
                    nn.init.xavier_uniform_(w)
                nn.init.zeros_(m.proj_out.weight)
        nn.init.zeros_(self.conv_out.weight)

    def forward(self, x, t, y=None):
        """x [N, C, H, W], t [N] integers in [0, T), y [N] labels (-1: null), one label, or None -> the prediction
        [N, C, H, W] (eps, or x0 or v: whatever it was trained to predict)."""
        if x.ndim != 4 or t.shape != (len(x),):
            raise ValueError(f"x must be [N, C, H, W] and t [N] timesteps, not {list(x.shape)} and {list(t.shape)}")
        temb = self.temb(timestep_embedding(t, self.ch).to(x.dtype))
        if self.class_emb is None and y is not None:  # guidance on it would silently do nothing
            raise ValueError("labels y given to a network without classes (num_classes = 0)")
        if self.class_emb is not None:
            y = torch.full_like(t, -1) if y is None else torch.as_tensor(y, device=t.device)
            if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool or y.shape not in ((), (1,), t.shape):
                raise ValueError(f"labels y must be integers, one per image or one for all, not {y.dtype} "
                                 f"{list(y.shape)}")  # (1.7 would be truncated to class 1)
            # -1 selects the null row; any other label outside [0, num_classes) fails the lookup, never selects it
            # (on a GPU as CUDA's device-side assert: a check here would wait for the GPU at every call)
            index = torch.where(y == -1, self.num_classes, torch.where(y >= self.num_classes, -1, y))
            try:
                temb = temb + self.class_emb(index.long())  # (int8 or int16 labels too)
            except IndexError:
                raise ValueError(f"labels y must be in [0, {self.num_classes}) or -1 (the null label)") from None

        hs = [self.conv_in(x)]
        for down in self.down:
            for block, attn in zip(down.block, down.attn):
                hs.append(attn(block(hs[-1], temb)))
            if hasattr(down, "downsample"):
                hs.append(down.downsample(hs[-1]))

        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(hs[-1], temb)), temb)

        for up in reversed(self.up):
            for block, attn in zip(up.block, up.attn):
                h = attn(block(torch.cat([h, hs.pop()], dim=1), temb))
            if hasattr(up, "upsample"):
                h = up.upsample(h)
        assert not hs
        return self.conv_out(F.silu(self.norm_out(h)))
