"""Sample images from a checkpoint written by train.py.

    python sample.py runs/shapes/ckpt.pt                          # a grid PNG beside the checkpoint
    python sample.py runs/shapes/ckpt.pt --n 1000 --out-dir gen/  # single PNGs, e.g. for fid.py
    python sample.py runs/shapes/ckpt.pt --sampler ddpm           # the paper's 1000-step ancestral sampler

The checkpoint carries the network and diffusion configuration; the EMA weights are used unless --no-ema.
"""
import argparse
import math
import os
import sys
import time

import numpy as np
import torch
from PIL import Image

import ddpm
import unet

# The default sampler and step count: the best quality for the time we measured (README, "Samplers").
DEFAULT_SAMPLER, DEFAULT_STEPS = "dpm++", 20
CHECKPOINT_KEYS = ("format", "step", "config", "model_config", "diffusion", "classes", "model", "ema")


def fastest_precision(device):
    """'bf16' where autocast to bf16 is faster than fp32 on this device, else 'fp32'. On CUDA that is any GPU
    with bf16; on a CPU it depends on the hardware (with AVX512-BF16/AMX bf16 wins; on AVX2 it is ~50x
    slower), so time one convolution of the network's kind both ways."""
    device = torch.device(device)
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    if device.type != "cpu":
        return "fp32"
    conv, x = torch.nn.Conv2d(64, 64, 3, padding=1), torch.randn(8, 64, 16, 16)
    seconds = {}
    with torch.no_grad():
        for name in ("fp32", "bf16"):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=name == "bf16"):
                conv(x)  # warm-up
                start = time.perf_counter()
                for _ in range(3):
                    conv(x)
            seconds[name] = time.perf_counter() - start
    return "bf16" if seconds["bf16"] < seconds["fp32"] else "fp32"


def load_checkpoint(path):
    """A train.py checkpoint as a dict, loaded without running any code from the file (weights_only).
    Raises ValueError with a one-line message for a missing, truncated or foreign file."""
    if not os.path.isfile(path):
        raise ValueError(f"{path}: no such checkpoint file (train.py writes RUN_DIR/ckpt.pt)")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, a pickle that wants code, not a torch file at all
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"{path}: not a loadable checkpoint ({first[:200]})") from None
    missing = [k for k in CHECKPOINT_KEYS if not isinstance(ckpt, dict) or k not in ckpt]
    if missing:
        raise ValueError(f"{path}: not a train.py checkpoint (missing {', '.join(missing)})")
    return ckpt


def build(ckpt, ema=True, device="cpu"):
    """The network (EMA or raw weights, in eval mode) and the Diffusion a checkpoint describes."""
    model = unet.UNet(**ckpt["model_config"])
    try:
        model.load_state_dict(ckpt["ema" if ema else "model"])
    except RuntimeError as e:
        raise ValueError(f"checkpoint weights do not fit its own configuration ({str(e).splitlines()[0]})") from None
    return model.to(device).eval(), ddpm.Diffusion(**ckpt["diffusion"]).to(device)


def to_uint8(x):
    """[N, C, H, W] in [-1, 1] -> uint8 numpy [N, H, W, C]."""
    return ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def save_grid(x, path, nrow=8, pad=2):
    """Images [N, C, H, W] in [-1, 1] as one PNG grid, nrow images per row, on a white background."""
    images = to_uint8(x)
    n, h, w, c = images.shape
    rows = math.ceil(n / nrow)
    grid = np.full((rows * (h + pad) + pad, nrow * (w + pad) + pad, c), 255, np.uint8)
    for i, im in enumerate(images):
        r, k = divmod(i, nrow)
        grid[pad + r * (h + pad):pad + r * (h + pad) + h, pad + k * (w + pad):pad + k * (w + pad) + w] = im
    Image.fromarray(grid[..., 0] if c == 1 else grid).save(path)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("ckpt", help="a checkpoint written by train.py")
    p.add_argument("--n", type=int, default=64, help="number of images")
    p.add_argument("--batch-size", type=int, default=64, help="images per forward pass")
    p.add_argument("--seed", type=int, default=0, help="seed of the initial noise and sampler noise")
    p.add_argument("--sampler", default=DEFAULT_SAMPLER, choices=("ddpm", "ddim", "dpm++"),
                   help="ddpm: ancestral, all T steps (paper); ddim: Song et al.; dpm++: DPM-Solver++(2M)")
    p.add_argument("--steps", type=int, default=DEFAULT_STEPS, help="steps for ddim and dpm++")
    p.add_argument("--eta", type=float, default=0.0, help="ddim noise: 0 deterministic, 1 DDPM-like")
    p.add_argument("--variance", default="beta", choices=("beta", "beta_tilde"), help="ddpm: sigma_t^2")
    p.add_argument("--grid", help="grid PNG path (default: samples.png beside the checkpoint)")
    p.add_argument("--nrow", type=int, default=8, help="images per grid row")
    p.add_argument("--out-dir", help="also write each image as a PNG in this folder")
    p.add_argument("--fid", metavar="REF", help="also print the FID of the --n samples against REF (a folder or "
                   "fid.py statistics .npz; a folder uses its first --n images)")
    p.add_argument("--fid-weights", help="the FID Inception weights file (see fid.py --help)")
    p.add_argument("--no-ema", action="store_true", help="use the raw weights instead of the EMA")
    p.add_argument("--precision", default="auto", choices=("auto", "bf16", "fp32"),
                   help="autocast precision of the network; auto: bf16 where it is measured faster, else fp32")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)

    def fail(msg):
        print(f"sample.py: error: {msg}", file=sys.stderr)
        raise SystemExit(2)

    if args.n < 1 or args.batch_size < 1:
        fail("--n and --batch-size must be at least 1")
    try:
        ckpt = load_checkpoint(args.ckpt)
        model, diffusion = build(ckpt, not args.no_ema, args.device)
        if args.sampler != "ddpm":
            ddpm.spaced_timesteps(diffusion.T, args.steps)  # validates --steps
    except ValueError as e:
        fail(str(e))
    channels, h, w = model.conv_in.in_channels, *ckpt["model_config"]["image_size"]
    device = torch.device(args.device)
    precision = fastest_precision(device) if args.precision == "auto" else args.precision
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")
    g = torch.Generator(device).manual_seed(args.seed)
    out = []
    for start in range(0, args.n, args.batch_size):
        b = min(args.batch_size, args.n - start)
        with autocast:
            out.append(diffusion.sample(model, (b, channels, h, w), device=device, generator=g, sampler=args.sampler,
                                        steps=args.steps, eta=args.eta, variance=args.variance).cpu())
        print(f"\r{start + b}/{args.n} images", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)
    x = torch.cat(out)
    grid = args.grid or os.path.join(os.path.dirname(os.path.abspath(args.ckpt)), "samples.png")
    save_grid(x, grid, nrow=args.nrow)
    print(f"wrote {grid} ({args.n} images, {args.sampler}"
          f"{'' if args.sampler == 'ddpm' else f', {args.steps} steps'}, seed {args.seed})")
    if args.out_dir:
        os.makedirs(args.out_dir, exist_ok=True)
        for i, im in enumerate(to_uint8(x)):
            Image.fromarray(im[..., 0] if channels == 1 else im).save(os.path.join(args.out_dir, f"{i:06d}.png"))
        print(f"wrote {args.n} PNGs to {args.out_dir}")
    if args.fid:
        import fid  # optional: only this flag needs fid.py

        try:
            value = fid.fid_from_samples(x, args.fid, args.n, weights=args.fid_weights, device=args.device)
        except fid.FIDError as e:
            fail(f"--fid: {e}")
        print(f"FID {value:.4f} against {args.fid} (n = {args.n}, {args.sampler}"
              f"{'' if args.sampler == 'ddpm' else f' {args.steps} steps'}, seed {args.seed})")


if __name__ == "__main__":
    main()
