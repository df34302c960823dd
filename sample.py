"""Sample images from a train.py checkpoint or a diffusers DDPM folder (the paper's released weights).

    python sample.py runs/shapes/ckpt.pt                          # a grid PNG beside the checkpoint
    python sample.py runs/shapes/ckpt.pt --n 1000 --out-dir gen/  # single PNGs, e.g. for fid.py
    python sample.py runs/shapes/ckpt.pt --sampler ddpm           # the paper's 1000-step ancestral sampler
    python sample.py runs/mnist/ckpt.pt --class 4 --guidance 3    # conditional runs: a class, guided
    python sample.py --forward photo.png --schedule cosine        # q(x_t | x_0) needs no checkpoint: forward.png
    python sample.py runs/mnist/ckpt.pt --nll test_images/ --n 1000  # the bound on the NLL in bits/dim (Table 1)
    python sample.py ddpm-cifar10-32/  # a diffusers DDPM folder (the Hub's layout); --export-diffusers DIR writes one

The checkpoint carries the network and diffusion configuration; the EMA weights are used unless --no-ema.
"""
import argparse
import math
import os
import re
import sys
import tempfile
import warnings

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image, ImageDraw, ImageOps

import data
import ddpm
from data import number, path

GRID_MAX = 256  # the sample grid shows at most the first 256 samples


def class_labels(ckpt, cls, guidance, n, nrow=8):
    """Each sample's label, or None for an unconditional checkpoint. `cls`: a class name or index (a string or
    number); without it each grid row of `nrow` images is one class (n defaults to a row per class), or, where n
    is too few for a row of each, the classes in order spread over the n images (every class where n >= classes)."""
    cls = None if cls is None else str(cls)
    classes = list(ckpt["classes"]) if ckpt["model_config"].get("num_classes") else []
    if not classes:
        if cls is not None or guidance:
            raise data.UserError("--class/--guidance: this checkpoint is unconditional (train with --cond for classes)")
        return None
    if cls is None:
        rows = nrow * len(classes)  # a row of nrow images per class
        n = n or rows
        return torch.arange(n) // nrow % len(classes) if n >= rows else torch.arange(n) * len(classes) // n
    numbered = any(c.isdecimal() for c in classes)  # folders 0, 1, 2, 3, 5: "4" must not quietly mean folder 5
    index = int(cls) if re.fullmatch("0|[1-9][0-9]{0,8}", cls) and not numbered else None  # "3", not "03" or "٣"
    if cls not in classes and not (index is not None and index < len(classes)):
        which = "one" if numbered else f"a name or index 0-{len(classes) - 1}"
        raise data.UserError(f"--class {cls}: not a class of this checkpoint; choose {which} of {', '.join(classes)}")
    return torch.full((n or 64,), classes.index(cls) if cls in classes else index)


def shown_classes(classes, labels, nrow):
    """The `wrote` line's words for labels drawn without --class: which classes, and whether a grid row is one."""
    names = [classes[i] for i in labels.unique().tolist()]
    listed = ", ".join(names if len(names) <= 6 else [*names[:3], "...", *names[-2:]])
    by_row = torch.equal(labels, labels[torch.arange(len(labels)) // nrow * nrow])  # each label is its row's first
    return f"classes {listed} ({len(names)} of {len(classes)}) {'by row' if by_row else 'in order over the images'}"


def check_null_label(ckpt, guidance, picture):
    """Refuse guidance, --inpaint, --mix and --nll (class-less: y is None) where they would use a null label that
    training never trained: only label dropout (train.py --p-uncond, 0.1 where a config lacks it) trains the class
    embedding's null row, which otherwise keeps its random start."""
    if not ckpt["model_config"].get("num_classes") or ckpt["config"].get("p_uncond", 0.1) != 0:
        return
    if guidance or picture in ("inpaint", "mix", "nll"):
        what = "--guidance" if guidance else f"--{picture} (class-less)"
        advice = "give --class without --guidance, or " if guidance else ""
        raise data.UserError(f"{what} uses the null label, which this conditional checkpoint never trained (--p-uncond 0): "
                         f"{advice}train with --p-uncond above 0 (e.g. 0.1)")


def load_image(path, channels, size, resample=Image.Resampling.LANCZOS):
    """An image file (data.read_image) as [1, C, H, W] in [-1, 1]; grey (C = 1) is ITU-R 601-2 luma, as Pillow's "L"."""
    with warnings.catch_warnings():  # data.read_image refuses a decompression bomb; Pillow's warning would be a 2nd line
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        image = Image.fromarray(data.read_image(path, size, resample)).convert("L" if channels == 1 else "RGB")
    return torch.from_numpy(np.array(image)).view(*size, channels).permute(2, 0, 1)[None].float() / 127.5 - 1


def load_mask(path, size, image=None):
    """--mask as {0, 1} [1, 1, H, W], 1 where to fill: 128 and up in an 8-bit mask, 1 in a 0/1 one. It must have
    the size of `image` (a path), if given, so that both are resized and cropped alike."""
    pixels = ((load_image(path, 1, size, Image.Resampling.NEAREST) + 1) * 127.5).round()  # checks the file
    with Image.open(path) as m, Image.open(image or path) as i:  # as shown: a phone photo's EXIF turns it upright
        m, i = ImageOps.exif_transpose(m), ImageOps.exif_transpose(i)
        if m.size != i.size:
            raise data.UserError(f"--mask {path} is {m.size[0]}x{m.size[1]} but {image} is {i.size[0]}x{i.size[1]}; "
                             "give a mask of the image's size")
    hole = pixels >= (1 if pixels.max() <= 1 else 128)
    if not hole.any():
        raise data.UserError(f"--mask {path}: nothing to fill; give white (or 1s) where pixels are to be filled")
    return hole.float()


def draw_picture(picture, model, diffusion, shape, n, loop, seed=0, labels=None, images=(), hole=None, ts=None,
                 weight=0.5, resample=1, jump=10, frames=5, mix_noise="shared"):
    """The process, forward, mix, inpaint or interp picture of n samples of `shape` (C, H, W) drawn with `loop`
    (Diffusion.loop's settings): a captioned strip; for process (strip, GIF frames). images: the [1, C, H, W] inputs;
    mix_noise: Diffusion.mix's noise, shared or separate."""
    device = diffusion.betas.device  # (--forward may have no network)
    g, y = torch.Generator(device).manual_seed(seed), None if labels is None else labels.to(device)
    default = (0, 50, 100, 250, 500, 750, 999) if picture == "forward" else (100, 250, 400, 550, 700, 850)
    ts = ts or sorted({min(round(t * diffusion.T / 1000), diffusion.T - 1) for t in default})  # at T = 1000, scaled
    measure = ImageDraw.Draw(Image.new("L", (1, 1))).textlength

    def scale(captions):  # 2x, or more where a caption is wider than its column
        return max(2, math.ceil((max(map(measure, captions)) + 2) / shape[-1]))
    if picture == "process":  # the strip: 10 steps (all if fewer) as columns, rows x_t and predicted x_0 of each sample
        x, steps = torch.randn((n, *shape), generator=g, device=device), []
        for t, after, x0 in diffusion.loop(model, x, y=y, generator=g, **loop):
            steps.append((t, x.float(), x0.float()))  # x_t, the step's input, and the x_0 predicted from it
            x = after  # the last x_0 predicted is the sample: the last step lands on it in every sampler
        width = min(10, len(steps))
        chosen = [steps[round(i * (len(steps) - 1) / max(width - 1, 1))] for i in range(width)]
        rows = [torch.stack([s[k][i] for s in chosen]) for i in range(n) for k in (1, 2)]
        zoom = scale([f"t={t}" for t, _, _ in steps])  # one for the strip and every frame
        strip = data.grid_image(torch.cat(rows), nrow=width, scale=zoom, labels=[f"t={t}" for t, _, _ in chosen])
        every = max(1, len(steps) // 100)  # at most ~100 frames, always ending on the last step
        shown = [steps[i] for i in sorted({*range(0, len(steps), every), len(steps) - 1})]
        return strip, [data.grid_image(torch.cat([xt, x0]), nrow=n, scale=zoom, labels=[f"t={t}"]) for t, xt, x0 in shown]
    if picture == "forward":  # q(x_t | x_0 = image) at each t, one noise draw
        noise = torch.randn(images[0].shape, generator=g, device=device)
        x = torch.cat([diffusion.q_sample(images[0], torch.tensor([t], device=device), noise) for t in ts])
        columns = [f"t={t}" for t in ts]
    elif picture == "mix":  # a, b, their pixel blend, then the blend noised to each t and denoised (Diffusion.mix)
        a, b = images
        mixes = [diffusion.mix(model, a, b, t, weight, g, mix_noise) for t in ts]
        x = torch.cat([a, b, (1 - weight) * a + weight * b, *mixes])
        columns = ["a", "b", "blend", *[f"t={t}" for t in ts]]
    elif picture == "inpaint":  # the image, the image with its hole greyed out, then n RePaint completions
        image, known = images[0], 1 - hole
        for _, x, _ in diffusion.inpaint_loop(model, image.repeat(n, 1, 1, 1), known, resample, generator=g, jump=jump):
            pass
        x, columns = torch.cat([image, image * known, x]), ["image", "masked", *["filled"] * n]
    else:  # interp: each of n rows slerps x_T (ddpm.slerp) between two noise draws, in `frames` frames
        g_cpu = torch.Generator().manual_seed(seed)
        z0, z1 = torch.randn((n, *shape), generator=g_cpu), torch.randn((n, *shape), generator=g_cpu)
        alphas = torch.linspace(0, 1, frames)
        x = torch.stack([ddpm.slerp(z0, z1, a) for a in alphas], 1).flatten(0, 1).to(device)
        for _, x, _ in diffusion.loop(model, x, y=None if y is None else y.repeat_interleave(frames), **loop):
            pass
        columns = [f"{a:.2f}" for a in alphas.tolist()]
    return data.grid_image(x, nrow=len(columns), scale=scale(columns), labels=columns)


def save_picture(picture, path):
    """A strip as PNG, or (strip, frames) as the strip's PNG or a GIF holding the last frame for two seconds."""
    strip, frames = picture if isinstance(picture, tuple) else (picture, None)
    if path.lower().endswith(".gif"):
        data.write_atomically(path, lambda f: frames[0].save(f, format="GIF", save_all=True, append_images=frames[1:],
                                                        loop=0, duration=[60] * (len(frames) - 1) + [2000]))
    else:
        data.save_png(strip, path)


def build_parser():
    p = data.Parser(prog="sample.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    positive = number(int, "[1, inf)")
    p.add_argument("ckpt", type=path, nargs="?", help="a checkpoint written by train.py, or a diffusers DDPM folder "
                   "(the Hub's google/ddpm-cifar10-32, ...) (--forward can do without)")
    p.add_argument("--num-samples", "--n", dest="n", type=number(int, "[1, 10000000]"),
                   help="images (default 64, or a row of --nrow per class; fewer: the classes spread over them in "
                   "order); torchrun takes --n itself: write --num-samples there")
    p.add_argument("--batch-size", type=positive, default=64, help="images per forward pass")
    p.add_argument("--seed", type=number(int, "[0, 4294967295]"), default=0, help="seed of initial and sampler noise")
    p.add_argument("--sampler", default=ddpm.DEFAULT_SAMPLER, choices=("ddpm", "ddim", "dpm++"),
                   help="ddpm: ancestral, all T steps (paper); ddim: Song et al.; dpm++: DPM-Solver++ (Lu et al.)")
    p.add_argument("--steps", type=positive, help=f"steps for ddim and dpm++ (default {ddpm.DEFAULT_STEPS}, or T if fewer)")
    p.add_argument("--class", dest="cls", metavar="CLASS", help="conditional: a class, by name (subfolder) or index")
    p.add_argument("--guidance", type=number(float, "[0, 1000]"), default=0.0, help="classifier-free guidance w: "
                   "eps = (1 + w) eps(x, y) - w eps(x, null) (Ho & Salimans; diffusers' guidance_scale is 1 + w); "
                   "the null label is trained only by train.py --p-uncond above 0")
    p.add_argument("--autoguide", type=path, metavar="WEAK", help="autoguidance (Karras et al. 2024): --guidance w "
                   "steers away from WEAK, an early checkpoint of the same run (train.py --snapshot): (1 + w) D - w "
                   "D_weak; two network calls a step")
    p.add_argument("--order", type=int, choices=(1, 2, 3), help="dpm++: 2M (default), 3M, or 1 (DDIM)")
    p.add_argument("--spacing", choices=("time", "logsnr"), help="dpm++: steps evenly spaced in t (default) or in "
                   "lambda = log(alpha / sigma), DPM-Solver's for small images (better on MNIST, worse on the shapes: "
                   "docs/benchmarks.md#quality3)")
    p.add_argument("--eta", type=number(float, "[0, 1]"), help="ddim noise: 0 deterministic (default), 1 DDPM-like")
    p.add_argument("--variance", choices=("beta", "beta_tilde"), help="ddpm and --nll: sigma_t^2 (default beta; for "
                   "a diffusers folder, its scheduler's)")
    p.add_argument("--grid", type=path, help=f"the grid (of the first {GRID_MAX} samples) or picture, .png (default: "
                   "beside the checkpoint file, or in the current folder)")
    p.add_argument("--nrow", type=number(int, f"[1, {GRID_MAX}]"), default=8, help="images per grid row")
    p.add_argument("--out-dir", type=path, help="also write each image as a PNG in this folder (new or empty)")
    p.add_argument("--replace", action="store_true", help="--out-dir: delete the images already in it first")
    p.add_argument("--fid", type=path, metavar="REF", help="also print the FID against REF (a folder or fid.py "
                   ".npz), and the samples' Inception Score (see fid.py --help)")
    p.add_argument("--fid-weights", type=path, help="the FID Inception weights file (see fid.py --help)")
    p.add_argument("--nll", type=path, metavar="FOLDER", help="instead of sampling, print the bound on the negative "
                   "log-likelihood of FOLDER's images (or shapes, the built-in set; --n of them, a seeded random "
                   "draw), read as train.py reads its data, in bits/dim: eq. 5 of the paper, all T terms, p's "
                   "variance --variance, x_t drawn with --seed; --precision auto is fp32 here")
    add_picture_flags(p.add_argument_group("pictures of the process (each writes its picture instead of a sample grid)"))
    p.add_argument("--no-ema", action="store_true", help="use the raw weights instead of the EMA (a train.py "
                   "checkpoint's: a diffusers folder holds one set)")
    p.add_argument("--export-diffusers", type=path, metavar="DIR", help="instead of sampling, write the checkpoint's "
                   "network and diffusion as a diffusers DDPMPipeline folder DIR, new or empty (unconditional, "
                   "ch_mult from 1, no --scale-shift)")
    p.add_argument("--precision", default="auto", choices=("auto", "bf16", "fp32"),
                   help="autocast precision; auto: bf16 where timed faster at start (may differ run to run), else fp32")
    p.add_argument("--device", help="cpu, cuda, cuda:1, mps, ... (default: cuda if available)")
    return p


def add_picture_flags(v):
    positive = number(int, "[1, inf)")
    one = v.add_mutually_exclusive_group()
    one.add_argument("--process", type=path, metavar="OUT", help="the reverse process of --n (default 4) samples, "
                     "x_t over predicted x_0: OUT.gif (each step, ~100 at most) or OUT.png (10 steps)")
    one.add_argument("--forward", type=path, metavar="IMAGE", help="IMAGE noised by q(x_t | x_0) at each --t (needs no "
                     "checkpoint: see --T, --schedule, --size)")
    one.add_argument("--mix", type=path, nargs=2, metavar=("A", "B"), help="A and B blended, noised to each --t and "
                     "denoised (ancestral)")
    one.add_argument("--inpaint", type=path, metavar="IMAGE", help="--n (default 4) RePaint completions of IMAGE")
    one.add_argument("--interp", type=number(int, "[2, 1000]"), metavar="FRAMES", help="--n (default 4) rows of "
                     "FRAMES samples, x_T slerped between two noise draws (dpm++, or ddim eta 0)")
    v.add_argument("--weight", type=number(float, "[0, 1]"), help="--mix: the weight of B in the blend (default 0.5)")
    v.add_argument("--mix-noise", choices=("shared", "separate"), help="--mix: shared (default): A and B noised with "
                   "one noise, which is the pixel blend noised, a proper x_t ~ q(x_t | blend); separate (seed 000's "
                   "way): each with its own noise, then blended, which holds less noise than x_t should (std "
                   "sqrt((1-w)^2 + w^2) sqrt(1 - alpha-bar_t): 0.71x at w 0.5)")
    v.add_argument("--t", type=number(int, "[0, inf)"), nargs="+", help="--forward/--mix: the steps (default "
                   "0 50 100 250 500 750 999 / 100 250 400 550 700 850, scaled to T)")
    v.add_argument("--T", type=number(int, "[2, 100000]"), help="--forward without a checkpoint: diffusion steps "
                   "(default 1000, the paper's)")
    v.add_argument("--schedule", choices=("linear", "cosine"), help="--forward without a checkpoint: the beta "
                   "schedule (default linear, the paper's)")
    v.add_argument("--size", type=number(int, "[1, 1024]"), help="--forward without a checkpoint: the image's "
                   "shorter side resized to SIZE and centre-cropped to SIZExSIZE, as train.py --size (default 32)")
    v.add_argument("--mask", type=path, help="--inpaint: an image whose white pixels (or 1s) are the ones to fill")
    v.add_argument("--resample", type=positive, default=1, help="--inpaint: RePaint's passes r (published: 10)")
    v.add_argument("--jump", type=positive, help="--inpaint --resample > 1: RePaint's jump j (default 10)")


def check_args(args, world=1):
    """Flag combinations, output paths and the device, before the checkpoint is even read; UserError if wrong."""
    picture = next((f for f in ("process", "forward", "mix", "inpaint", "interp") if getattr(args, f)), None)
    if not args.ckpt and picture != "forward":  # noising alone needs no network
        raise data.UserError("give a checkpoint (train.py writes RUN_DIR/ckpt.pt); only --forward IMAGE works without one")
    for given, allowed, message in flag_rules(args, picture, world):
        if given and not allowed:
            raise data.UserError(message)
    data.check_device(args.device)
    return picture, None if args.nll else check_outputs(args, picture)  # --nll writes no file


def flag_rules(args, picture, world):
    """The rules between flags: (the flag was given, it is used only when this holds, what to say)."""
    only, fixed = data.only_used_with, picture in ("forward", "mix", "inpaint")  # these take no sampler or classes
    return [
        (args.no_ema, not os.path.isdir(args.ckpt or ""), only("--no-ema", "a train.py checkpoint (a diffusers folder "
         "holds one set of weights)")),
        (picture or args.out_dir or args.fid or args.grid, not args.nll,
         "--nll writes no samples or picture: leave out --out-dir, --fid, --grid and the picture flags"),
        (args.steps or args.eta or args.order or args.spacing or args.sampler != ddpm.DEFAULT_SAMPLER, not args.nll,
         "--sampler, --steps, --eta, --order and --spacing are not used by --nll: the bound takes all T steps"),
        (args.cls is not None or args.guidance, not args.nll,
         "--class and --guidance are not used by --nll: it bounds the model without labels (the null label)"),
        (args.nll, world == 1, "--nll runs in one process: leave out torchrun"),
        (args.nll, args.nll == "shapes" or os.path.isdir(args.nll or ""), f"--nll {args.nll}: not a folder of images"),
        (args.steps, args.sampler != "ddpm", only("--steps", "--sampler ddim or dpm++ (ddpm takes all T steps)")),
        (args.eta, args.sampler == "ddim", only("--eta", "--sampler ddim")),
        (args.order or args.spacing, args.sampler == "dpm++", only("--order or --spacing", "--sampler dpm++")),
        (args.autoguide, args.guidance, "--autoguide needs --guidance w > 0: how far to steer from the weak model"),
        (args.autoguide, not (args.nll or fixed), only("--autoguide", "sampling, --process or --interp")),
        (args.variance, args.sampler == "ddpm" or args.nll, only("--variance", "--sampler ddpm or --nll")),
        (args.weight, picture == "mix", only("--weight", "--mix")),
        (args.mix_noise, picture == "mix", only("--mix-noise", "--mix")),
        (args.T or args.schedule or args.size, not args.ckpt,
         only("--T, --schedule or --size", "--forward without a checkpoint (a checkpoint has its own)")),
        (args.t, picture in ("forward", "mix"), only("--t", "--forward or --mix")),
        (args.mask, picture == "inpaint", only("--mask", "--inpaint")),
        (args.resample != 1, picture == "inpaint", only("--resample", "--inpaint")),
        (args.jump, args.resample > 1, only("--jump", "--inpaint --resample R (R > 1)")),
        (args.replace, args.out_dir, only("--replace", "--out-dir")),
        (args.fid_weights, args.fid, only("--fid-weights", "--fid")),
        (args.grid, picture != "process", "--grid is not used with --process: its picture goes to the --process path"),
        (args.out_dir or args.fid, not picture, f"--out-dir and --fid write samples, not the --{picture} picture"),
        (args.interp, args.sampler == "dpm++" or (args.sampler == "ddim" and not args.eta),
         "--interp needs a deterministic sampler (dpm++, or ddim with eta 0)"),
        (picture == "inpaint", args.mask, "--inpaint needs --mask: an image whose white pixels are the ones to fill"),
        (args.fid, args.n != 1, "--fid needs --n 2 or more"),
        (world > 1, args.out_dir and not args.fid and not picture,
         "several processes (torchrun) need --out-dir, and no --fid or picture: run fid.py on --out-dir afterwards"),
        (args.process, os.path.splitext(args.process or "")[1].lower() in (".gif", ".png"),  # ".png" has none
         "--process: give a .gif or .png path"),
        (args.grid, os.path.splitext(args.grid or "")[1].lower() == ".png", f"--grid {args.grid}: give a .png path"),
        (args.cls is not None or args.guidance, not fixed, f"--class and --guidance are not used by --{picture}"),
        (args.steps or args.order or args.spacing or args.sampler != ddpm.DEFAULT_SAMPLER, not fixed,
         f"--sampler, --steps, --order and --spacing are not used by --{picture}: it samples with ddpm (ancestral), "
         "or not at all"),
        (args.n, picture not in ("forward", "mix"), "--n is not used by --forward or --mix: they draw one picture"),
    ]


def check_outputs(args, picture):
    """The grid's (or picture's) path and --out-dir, before any sampling; returns the grid's path."""
    # beside a checkpoint file; with none, or a diffusers folder (the Hub's cache may be read-only): the current folder
    beside = os.path.dirname(os.path.abspath(args.ckpt)) if args.ckpt and not os.path.isdir(args.ckpt) else ""
    grid = args.grid or os.path.join(beside, f"{picture or 'samples'}.png")
    if args.out_dir and os.path.realpath(grid).startswith(os.path.join(os.path.realpath(args.out_dir), "")):
        raise data.UserError(f"--grid {grid} is inside --out-dir {args.out_dir}, where an FID would count it; move it")
    if args.ckpt and not (os.path.isfile(args.ckpt) or os.path.isdir(args.ckpt)):  # said so, not as --grid's folder
        data.load_checkpoint(args.ckpt)
    out, flag = (args.process, "--process") if args.process else (grid, "--grid")
    folder = os.path.dirname(os.path.abspath(out))
    if os.path.lexists(out) and not os.path.isfile(out):
        raise data.UserError(f"{flag} {out}: not a regular file (a folder, a link to nowhere, a FIFO?); give a file path")
    if not os.path.isdir(folder):
        raise data.UserError(f"{flag} {out}: its folder does not exist; give a file path in an existing folder")
    check_folder(folder, f"{flag} {out}")
    if args.out_dir:
        check_out_dir(args.out_dir, args.replace)
    return grid


def check_folder(folder, what):
    """Raise UserError, naming `what`, unless a new file can be made in `folder`."""
    try:
        tempfile.TemporaryFile(dir=folder).close()
    except OSError as e:
        raise data.UserError(f"{what}: cannot write in {folder} ({e.strerror})") from None


def check_out_dir(folder, replace):
    """--out-dir must be new, or hold only hidden files (.DS_Store) and, with --replace, images: an FID would count
    them. Made when sampling starts, so a refusal leaves none; never normalised ("link/../x" is the kernel's)."""
    given = existing = folder.rstrip("/") or "/"
    while not os.path.lexists(existing):  # up to the part of the path that exists
        existing = os.path.dirname(existing) or "."
    if not os.path.isdir(existing):
        what = "a file" if os.path.isfile(existing) else "a broken link or a special file"
        raise data.UserError(f"--out-dir {folder}: {existing} is {what}, not a folder; give a folder")
    found = sorted(f for f in os.listdir(folder) if not f.startswith(".")) if existing == given else []  # as FID
    images = [f for f in found if os.path.isfile(os.path.join(folder, f))  # or a killed write's NAME.png.<random>.tmp
              and os.path.splitext(re.sub(r"\.\w+\.tmp$", "", f))[1].lower() in data.IMAGE_EXTS]
    others = sorted(set(found) - set(images))  # --replace deletes images only: these make it refuse
    if (images and not replace) or others:
        raise data.UserError(f"--out-dir {folder} already holds {len(found)} file(s) (e.g. {(others or images)[0]}): "
                         f"choose an empty folder{'' if others else ', or add --replace to delete its images'}")
    check_folder(existing, f"--out-dir {folder}")


def main(argv=None):
    p = build_parser()
    args = p.parse_args(argv)
    try:
        generate(args, int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0")))
    except ValueError as e:  # every refusal (UserError, fid.py's FIDError): before sampling, or an FID after it
        p.error(str(e))
    except RuntimeError as e:
        if not data.out_of_memory(e):
            raise
        p.error(f"out of memory on {args.device}: give a smaller --batch-size (a picture: a smaller --n or FRAMES)")


def generate(args, world=1, rank=0):
    """Check every flag and the checkpoint, then write the picture, or the samples (grid, --out-dir, --fid)."""
    if args.export_diffusers:  # a conversion: no sampling flag applies
        return export(args)
    picture, grid = check_args(args, world)
    args.device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.nll:
        return print_nll(args)
    if world > 1:  # torchrun: each process samples its share and writes its PNGs; rank 0 the grid
        dist.init_process_group("gloo")
        if rank:
            sys.stdout = open(os.devnull, "w")
    args.n = args.n or (4 if picture else None)  # None: set with the labels below (a row per class, or 64)
    args.jump = args.jump or 10  # RePaint's published jump
    ckpt, model, diffusion, shape = network(args, picture)
    T, steps = diffusion.T, args.steps or (None if args.sampler == "ddpm" else min(ddpm.DEFAULT_STEPS, diffusion.T))
    check_steps(args, steps, T, ckpt)
    variance = args.variance or (ckpt and args.sampler == "ddpm" and ckpt.get("variance")) or "beta"  # (a diffusers
    guidance = 0.0 if args.autoguide else args.guidance  # classifier-free; autoguidance is in the model (network)
    loop = dict(sampler=args.sampler, steps=steps, eta=args.eta or 0.0, variance=variance,  # folder's: its scheduler's)
                guidance=guidance, order=args.order or 2, spacing=args.spacing or "time")
    labels = class_labels(ckpt, args.cls, guidance, args.n, 1 if picture else args.nrow) if ckpt else None
    images = [load_image(f, shape[0], shape[1:]).to(args.device) for f in args.mix or [args.forward, args.inpaint] if f]
    hole = load_mask(args.mask, shape[1:], args.inpaint).to(args.device) if args.mask else None
    args.n = len(labels) if labels is not None else args.n or 64
    meter = fid_meter(args, shape) if args.fid else None  # the reference read before sampling: a bad one fails now
    args.precision = data.fastest_precision(args.device) if args.precision == "auto" else args.precision
    autocast = torch.autocast(args.device.type, dtype=torch.bfloat16, enabled=args.precision == "bf16")
    if picture:
        with autocast:
            made = draw_picture(picture, model, diffusion, shape, args.n, loop, args.seed, labels, images, hole, args.t,
                                0.5 if args.weight is None else args.weight, args.resample, args.jump, args.interp,
                                args.mix_noise or "shared")
        save_picture(made, args.process or grid)
        said = "" if ckpt else f" ({shape[1]}x{shape[2]}, {diffusion.schedule} schedule, T = {T})"  # no checkpoint's
        print(f"wrote {args.process or grid}{said}")
        return
    samples = write_samples(diffusion, model, labels, shape, args, loop, autocast, rank, world)
    if rank:
        return
    what = args.sampler if args.sampler == "ddpm" else f"{args.sampler} {steps} steps"
    what += " even in log-SNR" if loop["spacing"] == "logsnr" else ""
    what += f", seed {args.seed}, {args.precision}"
    if labels is not None:
        chosen = f"class {args.cls}" if args.cls is not None else shown_classes(ckpt["classes"], labels, args.nrow)
        what += f", {chosen}, guidance {guidance:g}"
    if args.autoguide:
        what += f", autoguidance {args.guidance:g} from {args.autoguide}"
    data.save_grid(samples[:GRID_MAX], grid, nrow=args.nrow)
    print(f"wrote {grid} ({min(len(samples), GRID_MAX)} of {args.n} images, {what})")
    if args.out_dir:
        print(f"wrote {args.n} PNGs to {args.out_dir}" + (f" from {world} processes" if world > 1 else ""))
    if meter:  # the IS from the same Inception pass; its line first, the FID's last as before
        fid_of, reference, warning = meter
        value, inception, spread, splits = fid_of(samples, with_is=True)
        print(f"IS {inception:.4f} (std {spread:.2g}, splits {splits}; n = {args.n}, {what})")
        print(f"FID {value:.4f} against {args.fid}, {reference} (n = {args.n}, {what})")
        if warning:
            print(f"sample.py: warning: {warning}", file=sys.stderr)


def check_steps(args, steps, T, ckpt):
    """--steps, --t and --jump against the diffusion's T."""
    for flag, value, most in (("--steps", steps or 0, T), ("--t", max(args.t or [0]), T - 1),
                              ("--jump", args.jump if args.resample > 1 else 0, T - 1)):  # RePaint jumps from below T
        if value > most:
            where = "this checkpoint's diffusion has" if ckpt else "the diffusion (--T) has"
            raise data.UserError(f"{flag} {value}: {where} T = {T} steps; give at most {most}")


def fid_meter(args, shape):
    """fid.meter for --fid: fid.py is imported only here, so sample.py works copied without it (and scipy)."""
    try:
        import fid
    except ImportError as e:  # sample.py copied without fid.py
        raise data.UserError(f"--fid: cannot import fid.py ({e}); it must be beside sample.py") from None
    return fid.meter(args.fid, args.n, args.fid_weights, args.device, shape[1:], "--fid")


def print_nll(args):
    """--nll: eq. 5's bound on -log p(x_0) (ddpm.Diffusion.nll_terms) of the folder's images read at the checkpoint's
    size and channels, each image's x_t drawn from its own generator (seeded by --seed and its place in the folder,
    so batches do not matter); progress on stderr, the mean over images on stdout."""
    ckpt, model, diffusion, shape = network(args, "nll")
    try:
        images = data.load_dataset(args.nll, shape[1:], channels=shape[0])[0]
    except data.UserError as e:  # data.py names train.py's flag
        raise data.UserError(str(e).replace("--data", "--nll", 1)) from None
    n = min(args.n or len(images), len(images))
    chosen = torch.randperm(len(images), generator=torch.Generator().manual_seed(0))[:n].sort().values
    precision = "fp32" if args.precision == "auto" else args.precision  # bf16's error would loosen the bound
    variance = args.variance or ckpt.get("variance") or "beta"  # (a diffusers folder's: its scheduler's)
    T, every = diffusion.T, max(1, diffusion.T // 10)
    terms = torch.zeros(n, T + 1, dtype=torch.float64)  # bits/dim of each image: [:, t] step t's term, [:, T] prior
    for start in range(0, n, args.batch_size):
        idx = chosen[start:start + args.batch_size]
        x0 = data.batch_images(images, idx, args.device, False, shape[0])
        generators = [torch.Generator(args.device).manual_seed(sample_seed(args.seed, int(i))) for i in idx]
        with torch.autocast(args.device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            for t, bits in diffusion.nll_terms(model, x0, None, variance, generators):
                terms[start:start + len(idx), t] = bits.cpu()
                if t % every == 0:
                    print(f"\r{start + len(idx)}/{n} images, t {t}/{T}  ", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)
    total = terms.sum(1)
    spread = f", standard error {total.std().item() / math.sqrt(n):.2g}" if n > 1 else ""
    print(f"NLL <= {total.mean().item():.4f} bits/dim (n = {n} of {len(images)} in {args.nll}, {T} terms, prior "
          f"{terms[:, T].mean().item():.4f}, decoder {terms[:, 0].mean().item():.4f}, sigma_t^2 {variance}, seed "
          f"{args.seed}, {precision}{spread})")


def network(args, picture):
    """The checkpoint, its network (EMA or raw weights) and Diffusion, and the images' shape (C, H, W). --forward
    without a checkpoint noises with no network: the Diffusion of --schedule and --T (the paper's by default), images
    of --size (train.py's default, 32), one channel where IMAGE is grey (as train.py decides)."""
    if not args.ckpt:
        size = args.size or 32
        image = load_image(args.forward, 3, (size, size))
        diffusion = ddpm.Diffusion(args.schedule or "linear", args.T or 1000).to(args.device)
        return None, None, diffusion, (1 if (image[:, :1] == image[:, 1:]).all() else 3, size, size)
    ckpt = data.load(args.ckpt)
    check_null_label(ckpt, 0.0 if args.autoguide else args.guidance, picture)
    model, diffusion = data.build(ckpt, not args.no_ema, args.device)
    shape = (model.conv_in.in_channels, *ckpt["model_config"]["image_size"])
    if args.autoguide:  # the weak network must answer the same question: same network, diffusion and classes
        weak = data.load(args.autoguide)
        for key in ("model_config", "diffusion", "classes"):
            if weak.get(key) != ckpt.get(key):
                raise data.UserError(f"--autoguide {args.autoguide}: its {key} {weak.get(key)} is not the checkpoint's "
                                     f"{ckpt.get(key)}; give an earlier checkpoint of the same run")
        model = ddpm.autoguided(model, data.build(weak, not args.no_ema, args.device)[0], args.guidance)
    return ckpt, model, diffusion, shape


def export(args):
    """--export-diffusers: the checkpoint as a diffusers DDPMPipeline folder (data.export_diffusers). It samples
    nothing, so a sampling flag, which it would ignore, is refused."""
    default = vars(build_parser().parse_args([]))
    kept = ("ckpt", "export_diffusers") + (() if os.path.isdir(args.ckpt or "") else ("no_ema",))  # raw weights
    moot = [f"--{'class' if k == 'cls' else k.replace('_', '-')}" for k, v in vars(args).items()
            if v != default[k] and k not in kept]
    if moot or not args.ckpt:
        raise data.UserError("--export-diffusers writes a checkpoint as a folder and samples nothing: " +
                             (f"leave out {', '.join(moot)}" if moot else "give a checkpoint"))
    data.export_diffusers(data.load(args.ckpt), args.export_diffusers, not args.no_ema)
    print(f"wrote {args.export_diffusers}, a diffusers DDPMPipeline folder of {args.ckpt}'s "
          f"{'raw' if args.no_ema else 'EMA'} weights")


def write_samples(diffusion, model, labels, shape, args, loop, autocast, rank=0, world=1):
    """Sample every world-th of the --n images, writing each to --out-dir as it is made; return on rank 0 the samples
    in order (with --fid all, else the first GRID_MAX). Sample i's noise is seeded by (--seed, i) alone."""
    if args.out_dir:
        os.makedirs(args.out_dir, exist_ok=True)
    if args.replace and rank == 0:
        for f in os.listdir(args.out_dir):  # checked before: only images, and hidden files, which stay
            if not f.startswith("."):
                os.remove(os.path.join(args.out_dir, f))
    if world > 1:
        dist.barrier()  # every process has checked --out-dir before any writes to it
    kept, mine = {}, range(rank, args.n, world)
    for start in range(0, len(mine), args.batch_size):
        idx = list(mine[start:start + args.batch_size])
        generators = [torch.Generator(args.device).manual_seed(sample_seed(args.seed, i)) for i in idx]
        y = None if labels is None else labels[idx].to(args.device)
        with autocast:
            x = diffusion.sample(model, (len(idx), *shape), device=args.device, generator=generators, y=y, **loop)
        x = x.float().cpu()
        if not torch.isfinite(x).all():  # never a black image that looks like a result
            advice = "" if args.precision == "fp32" else "--precision fp32 or "
            print(f"sample.py: error: {int((~torch.isfinite(x)).flatten(1).any(1).sum())} of {len(x)} samples came "
                  f"out non-finite (NaN or inf); try {advice}another checkpoint", file=sys.stderr)
            raise SystemExit(1)
        if args.out_dir:
            for i, im in zip(idx, data.to_uint8(x)):
                png = Image.fromarray(im[..., 0] if shape[0] == 1 else im)
                data.save_png(png, os.path.join(args.out_dir, f"{i:06d}.png"))
        kept.update({i: image for i, image in zip(idx, x) if i < GRID_MAX or args.fid})
        if rank == 0:
            print(f"\r{min(idx[-1] + world, args.n)}/{args.n} images", end="", file=sys.stderr, flush=True)  # all ranks
    if world > 1:
        parts = [None] * world if rank == 0 else None
        dist.gather_object(kept, parts)
        kept = {i: image for part in parts or [] for i, image in part.items()}
        dist.destroy_process_group()
    print(file=sys.stderr)
    return torch.stack([kept[i] for i in sorted(kept)]) if rank == 0 else None


def sample_seed(seed, i):
    """Sample i's generator seed under --seed. 32 bits: a CPU generator keeps no more, so seed * 2**32 + i would
    drop --seed. Distinct for each i of a run; golden-ratio strides keep seeds 0-999 apart up to --n 1.9 million."""
    return (seed * 0x9E3779B9 + i) % 2 ** 32


if __name__ == "__main__":
    try:
        main()
    except OSError as e:  # a file that changed under us, a full disk: one line, not a traceback
        print(f"sample.py: error: {e.filename or ''}: {e.strerror or e}", file=sys.stderr)
        raise SystemExit(2)
    except KeyboardInterrupt:
        print("\nsample.py: interrupted; nothing more was written", file=sys.stderr)
        raise SystemExit(130)
