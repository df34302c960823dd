"""Train a DDPM (Ho, Jain & Abbeel 2020) on a folder of images, or on the built-in `shapes` dataset.

    python train.py --data shapes --size 16 --model tiny --steps 1200 --out runs/shapes   # CPU, minutes
    python train.py --data ./images --size 128 --out runs/mine                           # paper network
    python train.py --out runs/mine --resume --steps 200000                              # continue a run
    python train.py --data ./images --size 32 --model small --time 2h --out runs/2h       # a wall-clock budget
    python train.py --data ./images --size 64 --ch 64 --ch-mult 1,2,4,8 --out runs/net   # the network's size
    torchrun --nproc_per_node=4 train.py --data ./images --size 128 --batch 128          # data parallel
    python train.py --data ./images --size 32 --fid-every 5000 --fid-ref real.npz        # FID in metrics.jsonl

Everything of a run lands in --out: config.json (give it back with --config to repeat a run), ckpt.pt,
samples/ (EMA sample grids over time), metrics.jsonl and loss.png. Ctrl-C saves a checkpoint and exits.
"""
import argparse
import collections
import contextlib
import copy
import dataclasses
import fcntl
import functools
import io
import json
import math
import os
import re
import shutil
import signal
import sys
import time
import typing

STARTED = time.time()  # a command line's --time counts from here: importing torch and decoding the data count
import numpy as np
import torch
import torch.distributed as dist
from PIL import Image, ImageDraw

import data
import ddpm
import fid
import unet
from data import UserError, format_time, log, number, path

# --resume cannot change these: the network and the diffusion
FIXED = ("model", "size", "channels", "cond", "schedule", "T", "target", "loss", *unet.NETWORK_KEYS)
ONLY_WITH = {"fid_ref": "fid_every", "fid_every": "fid_ref", "lr_min": "cosine"}  # a setting: the one it serves
AUTO = ("channels", "precision", "accum")  # chosen by the data or the machine unless given; a --config chooses again
UNSET = object()  # marks a flag the command line did not give
CHUNK = 256  # images per network call when sampling grids and FIDs


def duration(text):
    """--time: "90s", "15m", "2h", "1h30m" or a bare number of seconds, as seconds."""
    text = text.strip().lower()
    if not re.fullmatch(r"(\d+(\.\d+)?[smh])+|\d+(\.\d+)?", text):
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration: give it like 90s, 15m, 2h or 1h30m")
    total = sum(float(n) * {"s": 1, "m": 60, "h": 3600}[u or "s"] for n, u in re.findall(r"([\d.]+)([smh]?)", text))
    if not 1 <= total < 1e7:
        raise argparse.ArgumentTypeError(f"{text} is not a duration between 1 second and 100 days")
    return total


def image_size(text):
    """--size: "128" or "HxW" like "64x128", each side 8 to 2048; returned in that canonical spelling."""
    try:
        h, w = (int(v) for v in text.lower().split("x")) if "x" in text.lower() else (int(text),) * 2
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size: give 128 or HxW like 64x128") from None
    if not (8 <= h <= 2048 and 8 <= w <= 2048):
        raise argparse.ArgumentTypeError(f"{text} is outside 8 to 2048 pixels a side")
    return str(h) if h == w else f"{h}x{w}"


def parse_size(text):
    h, _, w = text.partition("x")
    return int(h), int(w or h)


def width(text):
    """--ch: a multiple of 32, as GroupNorm's 32 groups need."""
    value = number(int, "[32, inf)")(text)
    if value % 32:
        raise argparse.ArgumentTypeError(f"{text} is not a multiple of 32 (GroupNorm's 32 groups)")
    return value


def t_density(text):
    """--t-density: "uniform", or "P_MEAN,P_STD" of ln sigma (like -1.2,1.2; "edm" is that), canonically spelt."""
    if text.strip().lower() in ("uniform", "edm"):
        return {"uniform": "uniform", "edm": "-1.2,1.2"}[text.strip().lower()]
    try:
        mean, std = (float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not uniform, edm or P_MEAN,P_STD like -1.2,1.2") from None
    if not (math.isfinite(mean) and abs(mean) <= 20):
        raise argparse.ArgumentTypeError(f"{text}: P_MEAN must be in [-20, 20]")
    if not 0 < std <= 10:
        raise argparse.ArgumentTypeError(f"{text}: P_STD must be in (0, 10]")
    return f"{mean:g},{std:g}"


def whole_numbers(text, most, example):
    """Comma-separated whole numbers in [1, most] as a tuple (--ch-mult, --attn-res)."""
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        values = ()
    if not values or not all(1 <= v <= most for v in values):
        raise argparse.ArgumentTypeError(f"{text!r} is not whole numbers from 1 to {most} like {example}")
    return values


def ch_mult(text):
    """--ch-mult: each level's channel multiplier, like 1,2,2,2, in that canonical spelling."""
    return ",".join(map(str, whole_numbers(text, 64, "1,2,2,2")))


def attn_res(text):
    """--attn-res: the (shorter) sides of the levels with attention, like 16 or 16,8 (largest first), or none."""
    if text.strip().lower() == "none":
        return "none"
    return ",".join(map(str, sorted(set(whole_numbers(text, 2048, "16,8")), reverse=True)))


def network(args):
    """The network flags that are set, as unet.model_config's keyword arguments (the preset gives the rest)."""
    kw = {k: getattr(args, k) for k in unet.NETWORK_KEYS if getattr(args, k) is not None}
    for k in ("ch_mult", "attn_res"):  # "1,2,2" -> (1, 2, 2), "none" -> ()
        if k in kw:
            kw[k] = tuple(int(v) for v in kw[k].split(",") if v != "none")
    return kw


def network_flags(net):
    """A unet.model_config as the network flags' values; attn_res: the sides of its attention levels, or none."""
    side, levels = min(net["image_size"]), unet.attention_levels(net["image_size"], net["ch_mult"],
                                                                 net.get("attn_res", unet.ATTN_RES))
    return dict(ch=net["ch"], ch_mult=",".join(map(str, net["ch_mult"])), num_res_blocks=net["num_res_blocks"],
                dropout=net["dropout"], attn_res=",".join(str(side // 2 ** level) for level in levels) or "none",
                norm_groups=net.get("norm_groups", 32), scale_shift=net.get("scale_shift", False))


def build_parser(prog="train.py"):
    """The parser and its actions by destination (for reading config files through the same checks)."""
    p, actions = data.Parser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter), {}

    def a(*names, **kw):
        action = p.add_argument(*names, **kw)
        actions[action.dest] = action
    positive, count = number(int, "[1, inf)"), number(int, "[0, inf)")
    a("--data", default="shapes", type=path, help="image folder (recursive), or 'shapes' for the built-in dataset")
    a("--size", type=image_size, default="32", help="128 or HxW like 64x128 (shorter side resized, centre crop)")
    a("--channels", type=int, choices=(1, 3), help="1 or 3; default: 1 if every image is grey, else 3")
    a("--no-flip", action="store_true", help="disable random horizontal flips")
    a("--cond", action="store_true", help="class-conditional: labels from first-level subfolder names")
    a("--p-uncond", type=number(float, "[0, 1)"), default=0.1, help="label dropout for guidance (Ho & Salimans)")
    a("--no-cache", action="store_true", help="do not cache the decoded images on disk")
    # network and diffusion
    recipes = " | ".join(f"{s}: {r['lr']:.0e}, {r['batch']}, {r['dropout']:g}" for s, r in unet.PAPER_SIZES.items())
    a("--model", default="paper", choices=list(unet.PRESETS), help="network preset and recipe (README); paper's lr, "
      f"batch, dropout at the size nearest the shorter side (64, 128: Nichol & Dhariwal's): {recipes}")
    a("--schedule", choices=("linear", "cosine"), help="beta schedule (default: the --model preset's)")
    a("--T", type=number(int, "[2, 100000]"), default=1000, help="number of diffusion steps")
    a("--target", choices=("eps", "x0", "v"), help="what the network predicts (default: the --model preset's)")
    a("--loss", default="mse", choices=("mse", "l1"), help="loss on the prediction")
    a("--immiscible", action="store_true", help="immiscible noise assignment (Li et al. 2024)")
    a("--t-density", type=t_density, help="how training draws t: uniform (Algorithm 1) or P_MEAN,P_STD: ln "
      "sigma_t ~ N(P_MEAN, P_STD^2), sigma_t^2 = 1/alpha-bar_t - 1, at the nearest step; edm: -1.2,1.2 (Karras et al. "
      "2022); a negative P_MEAN takes an = sign: --t-density=-0.8,1.6 (default: the --model preset's: paper uniform, "
      "small and tiny 0,1.2)")
    a("--input-perturbation", type=number(float, "[0, 1]"), default=0.0, help="DDPM-IP's gamma (Ning et al. 2023)")
    a("--ch", type=width, help="channel width of the first level, a multiple of 32 (default: the --model preset's)")
    a("--ch-mult", type=ch_mult, help="width multiplier per level (halving the image between them), like 1,2,2,2")
    a("--num-res-blocks", type=positive, help="ResNet blocks per level (default: the --model preset's)")
    a("--dropout", type=number(float, "[0, 1)"), help="dropout in the ResNet blocks (default: the --model preset's)")
    a("--norm-groups", type=int, choices=(1, 2, 4, 8, 16, 32), help="GroupNorm's groups (default: the --model "
      "preset's: paper 32; small and tiny 8, as one channel a group, 32 at --ch 32, normalises worst: Wu & He 2018)")
    a("--scale-shift", action=argparse.BooleanOptionalAction, help="AdaGN time conditioning: the timestep scales "
      "and shifts each ResNet block's second GroupNorm (Dhariwal & Nichol 2021) instead of adding to it (default: the "
      "--model preset's: on for small and tiny, off for paper; diffusers has no form of it, see --export-diffusers)")
    a("--attn-res", type=attn_res, help="attention at levels by shorter side: 16, 16,8 or none (default: nearest 16)")
    # optimisation (unset: the --model preset's value)
    a("--steps", type=positive, default=10000, help="optimizer steps of the whole run")
    a("--time", type=duration, help="a wall-clock budget like 15m, 2h, 90s instead of --steps (data decoding counts)")
    a("--batch", type=positive, help="global batch size (over all processes and accumulation)")
    a("--accum", type=positive, default=1, help="gradient accumulation: micro-batches per step")
    a("--lr", type=number(float, "(0, 1]"), help="peak learning rate")
    a("--warmup", type=count, help="linear learning-rate warm-up steps")
    a("--cosine", action=argparse.BooleanOptionalAction, help="cosine-anneal the lr to --lr-min after warm-up")
    a("--lr-min", type=number(float, "[0, 1]"), default=0.0, help="final learning rate with --cosine")
    a("--weight-decay", type=number(float, "[0, inf)"), default=0.0, help="AdamW weight decay (0: Adam, the paper's)")
    a("--grad-clip", type=number(float, "[0, inf)"), default=1.0, help="gradient norm clip (paper: 1.0; 0: none)")
    a("--ema", type=number(float, "[0, 1)"), help="EMA decay (paper: 0.9999), warmed up as min(decay, (1+n)/(10+n))")
    a("--ema-length", type=number(float, "(0, 0.28]"), help="instead of --ema: Karras et al. 2024's power-function EMA "
      "of this relative length sigma_rel (EDM2's best: 0.05 to 0.15), a fixed fraction of the steps taken so far")
    a("--precision", default="auto", choices=("auto", "bf16", "fp16", "fp32"), help="autocast; auto: bf16 if faster")
    a("--compile", action="store_true", help="torch.compile the network (off: slower on CPU, docs/benchmarks.md)")
    a("--seed", type=number(int, "[0, 4294967295]"), default=0, help="seed of data order, noise, t and dropout")
    # run folder
    a("--out", default="runs/run", type=path, help="run folder")
    a("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    a("--config", type=path, help="a run's config.json to repeat; flags override it, and its out is not used")
    a("--init", type=path, help="start from a checkpoint's or diffusers folder's weights, network, diffusion")
    a("--snapshot", type=number(float, "[0, 1)"), help="also keep the weights at this fraction of the run in "
      "snapshot.pt: the weak network of autoguidance (sample.py --autoguide); 0: none (default: the --model "
      "preset's: 0.35 for small and tiny)")
    a("--log-every", type=positive, default=50, help="steps between metrics lines")
    a("--sample-every", type=count, default=1000, help="steps between EMA sample grids (0: only at the end)")
    a("--sample-n", type=positive, default=64, help="images per sample grid (conditional: up to 8 a class, a row each)")
    a("--ckpt-every", type=positive, default=1000, help="steps between checkpoints")
    a("--fid-every", type=count, default=0, help="steps between FIDs of the EMA network in metrics.jsonl (0: never)")
    a("--fid-ref", help="FID reference: an image folder (--fid-n of it at random, at --size), a fid.py .npz; '': none")
    a("--fid-n", type=number(int, "[2, inf)"), default=1000, help="samples per FID (the reference folder uses as many)")
    a("--fid-weights", type=path, help="the FID Inception weights file (see fid.py --help)")
    a("--device", help="cuda, cuda:1, cpu, mps, ... (default: cuda if available)")
    return p, actions


def config_settings(config, actions, source):
    """A config (a --config file's or a checkpoint's) as settings, each through its flag's own type and choices, as
    if typed: a UserError names the file and the setting."""
    if not isinstance(config, dict):
        raise UserError(f"{source}: not a JSON object of settings")
    auto = config.get("auto", [])
    if not (isinstance(auto, list) and all(k in AUTO for k in auto)):
        raise UserError(f"{source}: auto: {auto!r} is not a list of some of {', '.join(AUTO)}")
    settings = {}
    for key, value in config.items():
        action = actions.get(key)
        if action is None and key != "auto":
            raise UserError(f"{source}: unknown setting {key!r}")
        if value is None or key in ("resume", "config", "out", "auto"):
            continue
        if action.nargs == 0:  # a switch (--no-flip, or --cosine/--no-cosine): true or false only
            if not isinstance(value, bool):
                raise UserError(f"{source}: {key}: {value!r} is not true or false")
        elif isinstance(value, bool) or not isinstance(value, (str, int, float)):
            raise UserError(f"{source}: {key}: {value!r} is not a single number or string")
        else:
            try:
                value = (action.type or str)(str(value))
            except (argparse.ArgumentTypeError, ValueError) as e:
                raise UserError(f"{source}: {flag(key)} {value}: {e}") from None
            if action.choices and value not in action.choices:
                raise UserError(f"{source}: {flag(key)} {value}: choose from {', '.join(map(str, action.choices))}")
        settings[key] = value
    return settings, auto


def read_config(given, actions):
    """The settings a config gives (--config FILE's, or on --resume the checkpoint's), where they come from, and the
    checkpoint to resume (or None)."""
    if given.config is UNSET and given.resume is UNSET:
        return {}, (), None, None
    starts = [name for name in ("config", "init") if getattr(given, name) is not UNSET]
    if given.resume is True and starts:
        raise UserError(f"--{starts[0]} and --resume: choose one (a resumed run keeps its checkpoint's settings and "
                        "weights)")
    if given.config is not UNSET:
        source = f"--config {given.config}"
        try:
            with open(given.config) as f:
                return (*config_settings(json.load(f), actions, source), source, None)
        except (OSError, ValueError) as e:
            if isinstance(e, UserError):
                raise
            raise UserError(f"{source}: cannot read it as JSON ({getattr(e, 'strerror', None) or e})") from None
    ckpt_path = os.path.join("runs/run" if given.out is UNSET else given.out, "ckpt.pt")
    try:
        ckpt = data.load_checkpoint(ckpt_path)
    except UserError as e:
        raise UserError(f"--resume: {e}") from None
    source = f"the checkpoint {ckpt_path}"
    # the network and diffusion it built, whatever its config says
    return (*config_settings({**ckpt["config"], **own_settings(ckpt, source)}, actions, source), source, ckpt)


def parse_args(argv=None):
    """The settings: the command line (parsed once) over a config's (--config FILE, or the checkpoint's on --resume)
    over the defaults, all through the flags' own checks. Returns them and the checkpoint to resume (or None)."""
    parser, actions = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    given = parser.parse_args(argv, argparse.Namespace(**dict.fromkeys(actions, UNSET)))
    try:
        config, auto, source, ckpt = read_config(given, actions)
        init, init_path = None, config.get("init") if given.init is UNSET else given.init
        if init_path and not ckpt:  # (a resumed run's weights are its checkpoint's)
            given_source, source = source, f"--init {init_path}"
            try:
                init = data.load(init_path)
            except UserError as e:
                raise UserError(f"{'--init' if given.init is not UNSET else given_source + ': init'}: {e}") from None
            recipe = {k: v for k, v in init["config"].items() if k == "model"}  # a checkpoint's preset (its recipe)
            config.update(config_settings({**recipe, **own_settings(init, source)}, actions, source)[0])
    except UserError as e:
        parser.error(str(e))
    owner = "the checkpoint's" if ckpt else "the weights'"  # --model only names a recipe for new runs from --init
    changed = [f"{flag(k)} {getattr(given, k)} ({owner}: {config.get(k)})" for k in FIXED if (ckpt or init and
               k != "model") and getattr(given, k) not in (UNSET, config.get(k))]
    if changed:
        what = "--resume cannot change" if ckpt else f"--init {init_path}: a new run keeps"
        parser.error(f"{what} the network and the diffusion: {'; '.join(changed)}")
    if not ckpt:  # a --config's "auto" settings are chosen again
        config = {k: v for k, v in config.items() if k not in auto}
    defaults = {k: a.type(a.default) if isinstance(a.default, str) and a.type else a.default for k, a in actions.items()}
    args = argparse.Namespace(**{**defaults, **config, **{k: v for k, v in vars(given).items() if v is not UNSET}})
    if given.time is not UNSET and (given.steps is not UNSET or ckpt):
        parser.error("--time plans a new run's --steps: give --time or --steps, not both (a resumed run: --steps)")
    if given.steps is not UNSET:
        args.time = None  # the command line's --steps over a config's --time
    complete(parser, args, given, ckpt, source)
    # what the data or the machine decides (setup_run, fit_memory), listed so that a --config decides it again
    inherited = [k for k in auto if getattr(given, k) is UNSET] if ckpt else []
    args.auto = [k for k in AUTO if getattr(args, k) in (None, "auto") or k in inherited]
    if args.data != "shapes":  # paths stored absolute, so --resume from elsewhere reads the same files
        args.data = os.path.abspath(args.data)
    args.fid_ref, args.fid_weights = (os.path.abspath(p) if p else None for p in (args.fid_ref, args.fid_weights))
    args.init = args.init and os.path.abspath(args.init)  # recorded in config.json: where the run started
    check_args(parser, args, ckpt, given, source)
    return args, ckpt, init


def flag(key):
    return "--" + key.replace("_", "-")


def own_settings(ckpt, source):
    """The settings of the network and diffusion a checkpoint built (size, channels, classes, schedule, T, target,
    loss, the network flags): what --resume keeps, read from them rather than from its config."""
    net = ckpt["model_config"]
    try:
        return dict(ckpt["diffusion"], size=image_size("x".join(map(str, net["image_size"]))), channels=net.get("in_ch"),
                    cond=bool(net.get("num_classes")), **network_flags(net))
    except (KeyError, TypeError, ValueError, argparse.ArgumentTypeError) as e:
        raise UserError(f"--resume: {source}: its network configuration is not one train.py writes ({e!r})") from None


def complete(parser, args, given, ckpt, source):
    """Fill in what no flag or config gave: the preset's recipe (its keys listed in args.from_preset, for the log) and
    the network (on --resume the checkpoint's, else the preset's under the network flags). First drop an inherited
    setting that only serves one the command line turned off (--fid-every 0): a check would blame it on the user."""
    for k, needs in ONLY_WITH.items():
        if getattr(given, k) is UNSET and getattr(given, needs) in (0, "") and getattr(args, k):
            if os.environ.get("RANK", "0") == "0":  # rank 0 alone logs
                only = data.only_used_with("it", flag(needs))
                log(f"{source}: {flag(k)} {getattr(args, k)} is dropped: {only}, which the command line turned off")
            setattr(args, k, parser.get_default(k))
    if ckpt and args.t_density is None:  # a checkpoint from before --t-density drew t uniformly
        args.t_density = "uniform"
    size = parse_size(args.size)
    preset = unet.preset(args.model, size)
    args.from_preset = [k for k, v in preset.items() if k not in unet.NETWORK_KEYS and getattr(args, k) is None]
    for k in args.from_preset:
        setattr(args, k, preset[k])
    net = ckpt["model_config"] if ckpt else unet.model_config(args.model, size, 3, **network(args))
    for k, v in network_flags(net).items():
        if getattr(args, k) is None:
            setattr(args, k, v)


def blame(message, args, given, source):
    """message, saying where the flags before its first ': ' that the command line did not give came from (the
    preset, a --config, the checkpoint): an error blames no one for a setting they never typed."""
    origins = collections.defaultdict(list)
    for name in dict.fromkeys(re.findall(r"(?<!\S)--[A-Za-z][A-Za-z-]*", message.split(": ")[0])):
        key = name[2:].replace("-", "_")
        if getattr(given, key, None) is UNSET:
            origins[f"the {args.model} preset" if key in args.from_preset else source].append(name)
    return message + "".join(f" ({', '.join(names)} from {where})" for where, names in origins.items() if where)


def check_args(parser, args, ckpt, given, source):
    """The checks that involve more than one flag, the file system or the machine; each a one-line error, saying
    where a flag it names came from if the command line did not give it."""
    size, world, folder = parse_size(args.size), int(os.environ.get("WORLD_SIZE", "1")), args.data != "shapes"
    betas = ddpm.beta_schedule(args.schedule, args.T)
    inside = os.path.join(os.path.realpath(args.out), "").startswith(os.path.join(os.path.realpath(args.data), ""))
    done = ckpt["step"] if ckpt else 0
    net = unet.model_config(args.model, size, 3, **network(args))
    levels = [min(size) // 2 ** level for level in range(len(net["ch_mult"]))]
    halvings = min((side & -side).bit_length() - 1 for side in size)  # how often --size can be halved
    fits = len(levels) <= halvings + 1  # (else unet.check_size below names sizes that work)
    problems = [  # realpath: --out inside --data through links too, as the data search follows them
        (args.batch % (world * args.accum), f"--batch {args.batch} is not divisible by {world} process(es) x --accum"),
        (args.lr_min > args.lr, f"--lr-min {args.lr_min} is above --lr {args.lr}"),
        (args.ema_length and given.ema is not UNSET, "--ema and --ema-length: choose one (a decay, or a length)"),
        (not ((betas > 0) & (betas < 1)).all(), f"--T {args.T} is too small for the {args.schedule} schedule: give 21 "
         f"or more, or --schedule cosine"),
        (not folder and max(size) > 256, f"--size {args.size}: the built-in shapes go up to 256; give --data a folder"),
        (folder and inside, f"--out {args.out} is inside --data {args.data}: its grids would be trained on; choose "
         "another --out"),
        (folder and not os.path.isdir(args.data), f"--data {args.data}: "
         f"{'not a folder' if os.path.exists(args.data) else 'no such folder'} (give a folder of images, or 'shapes')"),
        (args.fid_every and not args.fid_ref, "--fid-every needs --fid-ref: an image folder or a fid.py .npz"),
        (args.fid_ref and not args.fid_every, data.only_used_with("--fid-ref", "--fid-every N")),
        (args.time and args.fid_every and not ckpt, "--time cannot plan around --fid-every: give --steps instead"),
        (args.fid_ref and not os.path.exists(args.fid_ref), f"--fid-ref {args.fid_ref}: no such folder or file"),
        (done >= args.steps, f"--steps {args.steps}: the checkpoint is already at step {done}; give a larger one"),
        (ckpt and not {"optimizer", "scaler"} <= ckpt.keys(), f"--resume: {args.out}/ckpt.pt holds no optimizer state "
         "(cut down for sampling?): data.py can use it, but training cannot continue from it; start a new run"),
        (given.ch_mult is not UNSET and not fits, f"--ch-mult {args.ch_mult} halves the image {len(levels) - 1} "
         f"times, --size {args.size} only {halvings}: give at most {halvings + 1} multipliers"),
        (fits and not set(net["attn_res"]) <= set(levels), f"--attn-res {args.attn_res}: not a level of the network at --size "
         f"{args.size} (its levels: {', '.join(map(str, levels))}; or none)"),
    ]
    for bad, message in problems:
        if bad:
            parser.error(blame(message, args, given, source))
    if ckpt and args.cond:  # a renamed class folder, or other data, would silently remap the labels
        classes = data.class_labels(args.data, data.find_images(args.data), True)[1] if folder else list(data.SHAPES)
        if classes != list(ckpt["classes"]):
            parser.error(f"--resume: the classes of --data {args.data} ({', '.join(classes)}) are not the "
                         f"checkpoint's ({', '.join(ckpt['classes'])}); restore them, or start a new run")
    try:
        unet.check_size(size, net["ch_mult"])
        data.check_device(args.device)
    except ValueError as e:
        parser.error(blame(str(e if "--" in str(e) else f"--size {args.size}: {e}"), args, given, source))
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))  # as setup_device's
    if args.precision == "fp16" and device.type == "cpu":
        parser.error(blame("--precision fp16 on a CPU runs about 80x slower than fp32 (it has no fp16 kernels): give "
                           "--precision bf16, fp32 or auto", args, given, source))


# --- the loss curve, the run folder and signals --------------------------------------------------------------
def draw_loss_curve(metrics, path):
    """loss (log scale) against step as a PNG, drawn with Pillow."""
    points = [(m["step"], math.log10(max(m["loss"], 1e-12))) for m in metrics if "loss" in m]  # FID lines have none
    if len(points) < 2:
        return
    (first, _), (last, _) = points[0], points[-1]
    lo, hi = min(v for _, v in points), max(v for _, v in points)
    hi = hi if hi > lo else lo + 1
    W, H, L, B = 640, 360, 70, 40
    xy = lambda s, v: (L + (s - first) / max(last - first, 1) * (W - L - 20), 20 + (hi - v) / (hi - lo) * (H - 20 - B))
    im = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(im)
    d.rectangle([L, 20, W - 20, H - B], outline="black")
    d.line([xy(s, v) for s, v in points], fill=(31, 119, 180), width=2)
    for v in (lo, (lo + hi) / 2, hi):
        d.text((4, xy(first, v)[1] - 6), f"{10 ** v:.4g}", fill="black")
    d.text((L, H - B + 6), str(first), fill="black")
    d.text((W - 70, H - B + 6), str(last), fill="black")
    d.text((W // 2 - 60, H - 18), "step (loss on a log scale)", fill="black")
    data.save_png(im, path)


def claim_run_folder(out, resume, made):
    """Create and lock --out for this process: flock's lock, which the kernel drops when its process dies however it
    dies. A new run needs a folder with nothing of an earlier run in it. Returns the open lock file; adds the folders
    and the file it creates to `made`, oldest first (unclaim removes them if the start is refused)."""
    if os.path.exists(out) and not os.path.isdir(out):
        raise UserError(f"--out {out} is a file, not a folder: choose another --out")
    new, folder, lock_path = [], os.path.abspath(out), os.path.join(out, ".lock")
    while not os.path.exists(folder):  # --out, and the parents it needs
        new, folder = [folder, *new], os.path.dirname(folder)
    made += new + ([] if os.path.exists(lock_path) else [lock_path])
    try:
        os.makedirs(out, exist_ok=True)
        lock = open(lock_path, "a+")
    except OSError as e:
        raise UserError(f"--out {out}: cannot write there ({e.strerror}); choose another --out")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        lock.seek(0)
        raise UserError(f"--out {out} is in use by {lock.read().strip() or 'another process'}: wait for it, or choose another --out")
    # left by an earlier run: anything but the lock file and the empty samples/ of a start that failed
    earlier = [] if resume else sorted(f for f in os.listdir(out) if f != ".lock" and not (
        os.path.isdir(os.path.join(out, f)) and not os.listdir(os.path.join(out, f))))
    if earlier:
        hint = "add --resume to continue it" if "ckpt.pt" in earlier else "it holds no checkpoint to resume"
        raise UserError(f"--out {out} holds an earlier run ({', '.join(earlier[:4])}): {hint}, or choose another --out")
    lock.truncate(0)
    lock.write(f"train.py process {os.getpid()} on {os.uname().nodename}, since {time.strftime('%Y-%m-%d %H:%M:%S')}")
    lock.flush()
    return lock


def unclaim(made):
    """Remove what a start that ended before its first step created in --out, newest first: the lock file, then the
    folders (each only if empty), so that a refused start leaves --out as it was."""
    for p in reversed(made):
        with contextlib.suppress(OSError):
            (os.rmdir if os.path.isdir(p) else os.remove)(p)


class Stop:
    """SIGINT, SIGTERM (a scheduler's preemption) and SIGHUP (a closed session) all mean: stop cleanly, handled here
    alone. Inside `deferring()` (the steps, a checkpoint write) a signal is only recorded, and the loop stops after the
    step in flight; inside `interruptible()` (a grid, an FID) and elsewhere it raises KeyboardInterrupt at once."""
    SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)

    def __init__(self):
        self.signal, self.deferred, self.saved = None, False, None

    def __call__(self, signum, frame):
        self.signal = signal.Signals(signum).name
        if not self.deferred:
            raise KeyboardInterrupt(self.signal)

    def __enter__(self):
        self.previous = [signal.signal(s, self) for s in self.SIGNALS]
        return self

    @contextlib.contextmanager
    def deferring(self):
        self.deferred = True
        try:
            yield
        finally:
            self.deferred = False

    @contextlib.contextmanager
    def interruptible(self):
        """Work a signal may cut short (minutes of sampling, it may be): it ends there, and the step is saved at once."""
        self.deferred = False
        try:
            with contextlib.suppress(KeyboardInterrupt):
                yield
        finally:
            self.deferred = True

    def __exit__(self, kind, error, trace):
        for s, handler in zip(self.SIGNALS, self.previous):
            signal.signal(s, handler)
        if kind is KeyboardInterrupt:  # one line, no traceback
            kept = f"the checkpoint {self.saved[0]} (step {self.saved[1]}) is saved" if self.saved else "nothing was saved"
            print(f"\ntrain.py: stopped by {self.signal or 'SIGINT'}; {kept}", file=sys.stderr)
            raise SystemExit(128 + getattr(signal, self.signal or "SIGINT"))


# --- training --------------------------------------------------------------------------------------------
def setup_device(args):
    """(device, rank, world) from torchrun's environment and --device; CUDA gets TF32 matmuls."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    default = f"cuda:{os.environ.get('LOCAL_RANK', '0')}" if torch.cuda.is_available() else "cpu"  # torchrun's GPU
    device = torch.device(args.device or default)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    return device, dist.get_rank() if world > 1 else 0, world


def learning_rate(args, step):
    """Linear warm-up to --lr, then constant or (--cosine) annealed to --lr-min at --steps (a longer run re-plans)."""
    if args.cosine and step >= args.warmup:
        progress = (step - args.warmup) / max(args.steps - args.warmup, 1)
        return args.lr_min + (args.lr - args.lr_min) * 0.5 * (1 + math.cos(math.pi * progress))
    return args.lr * min(1.0, (step + 1) / max(args.warmup, 1))


def available_memory(device, root="/"):
    """Bytes this process may still allocate: CUDA's free memory; on a CPU, MemAvailable capped by every memory cgroup
    from this process's own (a container's, a SLURM job's) up to the root; None where unknown. root: of /proc, /sys."""
    if device.type != "cpu":
        return torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else None
    found, own = [], {}
    with contextlib.suppress(OSError, ValueError), open(os.path.join(root, "proc/meminfo")) as f:
        found += [int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:")]
    with contextlib.suppress(OSError), open(os.path.join(root, "proc/self/cgroup")) as f:
        for fields in (line.rstrip("\n").split(":", 2) for line in f):  # "0::/path" (cgroup v2), "4:memory:/path" (v1)
            if len(fields) == 3:
                own.update(dict.fromkeys(fields[1].split(","), "/" + fields[2].strip("/")))
    for mount, name, limit, usage, cache in (("sys/fs/cgroup", "", "memory.max", "memory.current", "inactive_file"),
                                             ("sys/fs/cgroup/memory", "memory", "memory.limit_in_bytes",
                                              "memory.usage_in_bytes", "total_inactive_file")):
        group = own.get(name, "/")
        while True:  # a group missing here is outside this mount's view (a container's): its parents may not be
            with contextlib.suppress(OSError, ValueError):  # "max" means no limit
                folder = os.path.join(root, mount, group.lstrip("/"))
                with open(os.path.join(folder, limit)) as f, open(os.path.join(folder, usage)) as g:
                    free = int(f.read()) - int(g.read())
                with contextlib.suppress(OSError), open(os.path.join(folder, "memory.stat")) as f:
                    free += sum(int(v) for k, v in map(str.split, f) if k == cache)  # page cache it would reclaim
                found.append(free)
            if group == "/":
                break
            group = os.path.dirname(group)
    return min(found) if found else None


def step_memory(run):
    """(fixed, per image) bytes a step adds: fixed, the gradients and Adam's moments (3x the weights); per image, what
    autograd keeps for the backward, measured with 1 and 2 images (it grows linearly); both plus 25% for transients."""
    kept = []
    for n in (1, 2):
        storages = {}

        def pack(t):
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t
        x_t = torch.zeros(n, run.args.channels, *run.size, device=run.device)
        t = torch.zeros(n, dtype=torch.int64, device=run.device)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), run.autocast:
            run.model(x_t, t, t if run.args.cond else None)
        kept.append(sum(storages.values()))
    weights = sum(p.numel() * p.element_size() for p in run.model.parameters())
    per_image = 1.25 * (kept[1] - kept[0])
    return 3 * weights + 1.25 * kept[0] - per_image, per_image


def fit_memory(run):
    """Raise --accum until a step fits in the device's free memory (the batch stays), or refuse a step that cannot.
    Returns the estimate for the first log line."""
    args, micro, free = run.args, run.args.batch // run.world, available_memory(run.device)
    if free is None:
        return "memory not known"
    try:
        fixed, per_image = step_memory(run)
    except RuntimeError as e:
        if not data.out_of_memory(e):
            raise
        raise UserError(f"--batch {args.batch}: even a probe of one image runs out of memory on {run.device}; choose a smaller "
             f"--model (tiny, small) or --size")
    need = {a: fixed + micro // a * per_image for a in range(args.accum, micro + 1) if micro % a == 0}
    fits = [a for a, bytes_ in need.items() if bytes_ < 0.9 * free]
    if not fits:
        raise UserError(f"--batch {args.batch}: one image per micro-batch needs about {(fixed + per_image) / 2**30:.3g} GB of the "
             f"{free / 2**30:.3g} GB free on {run.device}; choose a smaller --model (tiny, small) or --size")
    accum = torch.tensor([fits[0]], device=run.device)
    if run.world > 1:  # every process must accumulate alike
        dist.all_reduce(accum, dist.ReduceOp.MAX)
    accum = int(accum.item())
    if accum != args.accum:
        log(f"memory: {micro // args.accum} images per process need about {need[args.accum] / 2**30:.3g} GB of the "
            f"{free / 2**30:.3g} GB free: --accum {accum} instead of {args.accum} (the batch stays {args.batch})")
        args.accum, args.auto = accum, [k for k in AUTO if k in args.auto or k == "accum"]
    return f"about {need[args.accum] / 2**30:.3g} of {free / 2**30:.3g} GB free"


@dataclasses.dataclass
class Meter:
    """The loop's progress counters: what report() needs for the loss, img/s and the ETA."""
    first: int  # the step the loop started at
    t0: float = dataclasses.field(default_factory=time.perf_counter)  # when it started
    steps_s: float = 0.0  # seconds spent in steps alone (not grids, FIDs, checkpoints)
    logged_s: float = 0.0  # steps_s at the last log line
    drawn: float = 0.0  # when the terminal's progress line was last drawn
    loss: torch.Tensor = 0.0  # summed on the device since the last log line, over n steps
    n: int = 0


@dataclasses.dataclass
class Run:
    """Everything the loop shares, filled in once by setup_run; only `metrics` grows after it."""
    args: argparse.Namespace  # the settings, all decided (the data's and the machine's choices too)
    size: tuple  # (H, W)
    device: torch.device
    world: int  # processes
    master: bool  # rank 0: it alone logs, samples and writes
    started: float  # when --time's budget began (time.time())
    ckpt_path: str
    metrics_path: str
    sample_steps: int  # of the default sampler, for grids and FIDs
    metrics: list = dataclasses.field(default_factory=list)  # metrics.jsonl's records so far
    fid_of: typing.Callable = None  # fid.meter's, where --fid-every is given (rank 0)
    fid_ref: str = ""  # which reference images it compares with
    fid_warning: str = None
    images: torch.Tensor = None  # uint8 [N, C, H, W], memory-mapped
    labels: torch.Tensor = None  # [N]
    classes: list = None  # names, [] without --cond
    model_config: dict = None
    model: torch.nn.Module = None  # the bare network: EMA updates and checkpoints use it
    train_model: torch.nn.Module = None  # what the steps run: the network wrapped by DDP and torch.compile
    ema: torch.nn.Module = None
    diffusion: ddpm.Diffusion = None
    optimizer: torch.optim.Optimizer = None
    autocast: torch.autocast = None
    scaler: torch.amp.GradScaler = None
    first_bad: torch.Tensor = None  # the first step whose loss, and whose gradient, was non-finite (-1: none yet)
    variance: str = None  # the ddpm sampler's, where the diffusers scheduler the run started from chose one
    meter: Meter = None  # the loop's progress


def load_data(run, init):
    """The data, mapped from its cache: one process per machine decodes into it first, the others then map it."""
    args, decoder = run.args, int(os.environ.get("LOCAL_RANK", "0")) == 0
    if run.world > 1 and not decoder:
        dist.barrier()
    try:
        run.images, run.labels, run.classes = data.load_dataset(args.data, run.size, args.cond, args.channels,
                                                                not args.no_cache)
    except UserError as e:  # --cond, --size and --channels may be --init's
        raise UserError(f"{e} (--init {args.init} is a network of {init['model_config']['num_classes'] or 'no'} "
                        f"classes at {args.size})" if init else str(e)) from None
    if run.world > 1 and decoder:
        dist.barrier()


def setup_run(args, ckpt, init, device, rank, world, started):
    """The Run: the mapped data, the network, its EMA, the diffusion, the optimizer, the precision and the run
    folder's files; a resumed run's state from its checkpoint, a new run's weights from --init's."""
    run = Run(args=args, size=parse_size(args.size), device=device, world=world, master=rank == 0, started=started,
              ckpt_path=os.path.join(args.out, "ckpt.pt"), metrics_path=os.path.join(args.out, "metrics.jsonl"),
              sample_steps=min(ddpm.DEFAULT_STEPS, args.T))
    if args.fid_every and run.master:  # loaded before training, so a bad reference fails now; a folder is read at
        try:  # --size, as the data is, and --fid-n of it drawn at random (not the first names: one class of many)
            run.fid_of, run.fid_ref, run.fid_warning = fid.meter(args.fid_ref, args.fid_n, args.fid_weights, device,
                                                                 run.size, "--fid-ref/--fid-weights", {"--n": "--fid-n"})
        except fid.FIDError as e:
            raise UserError(str(e))
    load_data(run, init)
    args.channels = args.channels or run.images.shape[1]  # recorded, so --resume can refuse another
    # a resumed run keeps the network it was built with, whatever the presets have become since
    start = ckpt or init
    run.model_config = start["model_config"] if start else unet.model_config(args.model, run.size, args.channels,
                                                                             len(run.classes), **network(args))
    run.variance = start and start.get("variance")
    if init and init["model_config"]["num_classes"] != len(run.classes):
        raise UserError(f"--init {args.init}: a network of {init['model_config']['num_classes']} classes, --data "
                        f"{args.data} has {len(run.classes)}{' (no --cond)' if not args.cond else ''}")
    torch.manual_seed(args.seed)  # the initial weights, the same in every process
    try:
        run.model = unet.UNet(**run.model_config).to(device)
    except (TypeError, ValueError) as e:
        raise UserError(f"--resume: the checkpoint's network configuration does not build here ({e})")
    if init and not ckpt:  # fine-tuning starts from the averaged weights (a diffusers folder has no others)
        run.model.load_state_dict(init["ema"])
        log(f"--init {args.init}: its weights{' at step ' + str(init['step']) if init['step'] else ''}, a fresh optimizer")
        if init["classes"] and init["classes"] != run.classes:  # its label embeddings are by index, not by name
            log(f"warning: --init's classes ({', '.join(init['classes'])}) are not --data's ({', '.join(run.classes)}): "
                "each class of --data starts from the embedding of the one in its place")
    run.ema = copy.deepcopy(run.model).requires_grad_(False).eval()
    run.diffusion = ddpm.Diffusion(args.schedule, args.T, args.target, args.loss).to(device)
    run.optimizer = torch.optim.AdamW(run.model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    if args.precision == "auto":  # decided once and recorded, so a resumed run computes as it did
        args.precision = data.fastest_precision(device)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.precision]
    run.autocast = torch.autocast(device.type, dtype=dtype, enabled=args.precision != "fp32")
    run.scaler = torch.amp.GradScaler(device.type, enabled=args.precision == "fp16")
    run.first_bad = torch.full((2,), -1, device=device)
    if ckpt:
        resume(run, ckpt)
    run.train_model = run.model  # what the steps run: DDP and compile wrap it; the EMA and checkpoints use run.model
    if world > 1:
        run.train_model = torch.nn.parallel.DistributedDataParallel(
            run.model, device_ids=[device.index] if device.type == "cuda" else None)
    if args.compile:
        run.train_model = torch.compile(run.train_model)
    need = 4 * sum(p.numel() * p.element_size() for p in run.model.parameters())  # weights, EMA, Adam's 2 moments
    free = shutil.disk_usage(args.out).free if run.master else math.inf  # rank 0 alone writes (and has --out)
    if free < 1.05 * need:  # checked before training, not after it
        raise UserError(f"--out {args.out}: {free / 2**20:.1f} MB free, a checkpoint needs about {need / 2**20:.1f} MB; free disk "
             "space or choose another --out")
    return run


def resume(run, ckpt):
    """Load a checkpoint's training state; name the settings the flags changed, and the learning rate they re-plan."""
    try:
        for name in ("model", "ema", "optimizer", "scaler"):
            if name != "scaler" or ckpt[name]:  # an fp32 run's scaler holds nothing: it may resume in fp16
                getattr(run, name).load_state_dict(ckpt[name])
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        raise UserError(f"--resume: the checkpoint's {name} state does not fit its network ({data.one_line(e, last=True)})")
    args, start, old = run.args, ckpt["step"], ckpt["config"]
    changed = [f"{flag(k)} {old[k]} -> {v}" for k, v in vars(args).items()
               if k in old and v != old[k] and k not in ("out", "auto", "time")]  # a resumed run never re-plans --time
    log(f"resumed {run.ckpt_path} at step {start}" + (f", with changed settings: {', '.join(changed)}" if changed else ""))
    if ckpt.get("images", len(run.images)) != len(run.images):  # older checkpoints have no count
        log(f"--data {args.data}: {len(run.images)} images where the checkpoint's run had {ckpt['images']}")
    before, now = learning_rate(argparse.Namespace(**{**vars(args), **old}), start), learning_rate(args, start)
    if f"{before:.6g}" != f"{now:.6g}":
        log(f"the learning rate is re-planned from these settings: {before:.6g} -> {now:.6g} at step {start + 1}")


def open_metrics(run, start):
    """Write config.json; keep metrics.jsonl's records up to step `start`, less any line a kill left half-written."""
    write_config(run.args)
    with contextlib.suppress(FileNotFoundError), open(run.metrics_path) as f:
        for line in f:
            with contextlib.suppress(ValueError):
                m = json.loads(line)
                if isinstance(m, dict) and isinstance(m.get("step"), int) and m["step"] <= start:
                    run.metrics.append(m)
    with open(run.metrics_path, "w") as f:
        f.writelines(json.dumps(m) + "\n" for m in run.metrics)


def config_of(args):
    return {k: v for k, v in vars(args).items() if k not in ("resume", "config", "from_preset")}


def write_config(args):
    with open(os.path.join(args.out, "config.json"), "w") as f:
        json.dump(config_of(args), f, indent=1)


def record(run, m):
    run.metrics.append(m)
    with open(run.metrics_path, "a") as f:
        f.write(json.dumps(m) + "\n")


def next_batch(run, step, rank):
    """This process's share of the step's global batch, x_0 ~ q(x_0) in [-1, 1] (flipped at random unless --no-flip),
    and its labels (None without --cond), each dropped to the null label -1 with probability --p-uncond: label
    dropout trains the unconditional model of guidance. Seeded by (--seed, step, rank), as t, eps and dropout are."""
    args = run.args
    torch.manual_seed((args.seed * 1_000_003 + step) * 4096 + rank)
    idx = data.batch_indices(step, args.batch, len(run.images), args.seed)[rank::run.world]
    x0 = data.batch_images(run.images, idx, run.device, flip=not args.no_flip, channels=args.channels)
    if not args.cond:
        return x0, None
    y = run.labels[idx].to(run.device, non_blocking=True)
    return x0, torch.where(torch.rand(len(idx), device=run.device) < args.p_uncond, -1, y)


@contextlib.contextmanager
def guarded(run, step, first):
    """Running out of memory at a step (and a torch.compile that fails on its first call) as one line."""
    try:
        yield
    except RuntimeError as e:  # CUDA's OutOfMemoryError is one, a CPU's out of memory and a failed compile too
        if data.out_of_memory(e):
            raise UserError(f"out of memory on {run.device} at step {step + 1}: add --accum {run.args.accum * 2} (the "
                            "batch stays), then --resume if a checkpoint exists") from None
        if run.args.compile and first:
            raise UserError(f"--compile: torch.compile failed ({data.one_line(e)}); train without --compile") from None
        raise


def train_step(run, x0, y, step):
    """Algorithm 1, lines 3-5 over --accum micro-batches, the gradient clipped, the optimizer's step and the EMA
    update; returns the loss as a tensor on the device. The first step whose loss or gradient is non-finite is noted
    there (run.first_bad; fp16: the scaler skips such steps); check_finite reads it before anything is logged,
    sampled or saved, so a diverged run never overwrites the last good checkpoint."""
    args, micro, loss = run.args, len(x0) // run.args.accum, 0.0
    model = run.model  # the bare network (clip, EMA); the loss runs its wrapper run.train_model (DDP, torch.compile)
    lognormal = None if args.t_density == "uniform" else tuple(map(float, args.t_density.split(",")))
    for k in range(args.accum):  # Algorithm 1, lines 3-5 (training_loss draws t and eps) on each micro-batch
        part = slice(k * micro, (k + 1) * micro)
        sync = run.world == 1 or k == args.accum - 1  # DDP all-reduces the gradients on the last micro-batch only
        with contextlib.nullcontext() if sync else run.train_model.no_sync(), run.autocast:
            t = run.diffusion.sample_t(micro, x0.device, lognormal)
            micro_loss = run.diffusion.training_loss(run.train_model, x0[part], None if y is None else y[part], t,
                                                     immiscible=args.immiscible, perturb=args.input_perturbation)
        run.scaler.scale(micro_loss / args.accum).backward()
        loss = loss + micro_loss.detach().float() / args.accum  # on the device: read with a log line, not each step
    run.scaler.unscale_(run.optimizer)
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip if args.grad_clip > 0 else math.inf)
    bad = torch.stack([~torch.isfinite(loss), ~torch.isfinite(grad_norm) & (not run.scaler.is_enabled())])
    run.first_bad = torch.where(bad & (run.first_bad < 0), step, run.first_bad)
    run.scaler.step(run.optimizer)
    run.scaler.update()
    run.optimizer.zero_grad(set_to_none=True)
    with torch.no_grad():
        decay = ema_decay(args.ema, args.ema_length, step + 1)
        torch._foreach_lerp_(list(run.ema.parameters()), list(model.parameters()), 1 - decay)
    return loss


def ema_decay(decay, sigma_rel, t):
    """The EMA's decay at its t-th update: --ema's decay, warmed up as min(decay, (1 + n) / (10 + n)), n = t - 1, so
    short runs get a usable average; or with sigma_rel, Karras et al. 2024's power function EMA (eq. 3 and Algorithm
    2): decay (1 - 1/t)^(gamma + 1), an average over a fixed fraction of the t steps, of relative std sigma_rel =
    sqrt((gamma + 1) / ((gamma + 2)^2 (gamma + 3))), i.e. gamma the root of gamma^3 + 7 gamma^2 + (16 - s) gamma +
    12 - s = 0, s = sigma_rel^-2."""
    if not sigma_rel:
        return min(decay, t / (9 + t))
    return float((1 - 1 / t) ** (power_ema_gamma(sigma_rel) + 1))


@functools.cache  # once a run, not at every step
def power_ema_gamma(sigma_rel):
    return max(np.roots([1, 7, 16 - sigma_rel ** -2, 12 - sigma_rel ** -2]).real)


def check_finite(run):
    """Stop the run (exit status 1) if a step's loss or gradient became non-finite since it began."""
    found = [(step, what) for step, what in zip(run.first_bad.tolist(), ("loss", "gradient")) if step >= 0]
    if found:
        step, what = min(found, key=lambda f: f[0])  # the loss's first where both went at one step
        good = f"the last good one is {run.ckpt_path}" if os.path.exists(run.ckpt_path) else "there is none"
        print(f"train.py: error: the {what} became non-finite at step {step + 1}: not saved ({good}); try a lower --lr "
              "or --precision fp32", file=sys.stderr)
        raise SystemExit(1)


def checkpoint(run, step, stop, path=None):
    """Save atomically (a kill or a full disk leaves the previous checkpoint whole), then the loss curve. With a path:
    --snapshot's, the weights alone (for sampling; a run resumes from ckpt.pt)."""
    check_finite(run)
    state = data.checkpoint_state(step, config_of(run.args), run.model_config, run.diffusion, run.classes,
                                  run.model, run.ema, run.optimizer, run.scaler, len(run.images), run.variance)
    if path:
        del state["optimizer"], state["scaler"]
    target = path or run.ckpt_path
    try:
        data.write_atomically(target, functools.partial(torch.save, state), tmp=target + ".tmp")
    except (OSError, RuntimeError) as e:  # torch reports a failed write as a RuntimeError
        kept = f"{target}, the previous checkpoint, is untouched: free disk space, then --resume" if \
            os.path.exists(target) else "no checkpoint was written: free disk space, then start a new --out"
        raise UserError(f"cannot write {target}.tmp ({getattr(e, 'strerror', None) or data.one_line(e, True)}); {kept}")
    if not path:
        stop.saved = (run.ckpt_path, step)
        draw_loss_curve(run.metrics, os.path.join(run.args.out, "loss.png"))


def ema_samples(run, n, y):
    """n EMA samples with the default sampler, the same seed every time so grids compare across steps."""
    check_finite(run)
    g, out = torch.Generator(run.device).manual_seed(run.args.seed), []
    for i in range(0, n, CHUNK):
        with run.autocast:
            out.append(run.diffusion.sample(run.ema, (min(CHUNK, n - i), run.args.channels, *run.size), device=run.device,
                                            generator=g, sampler=ddpm.DEFAULT_SAMPLER, steps=run.sample_steps,
                                            y=None if y is None else y[i:i + CHUNK]).float())
    return torch.cat(out)


def grid_labels(run):
    """A sample grid's labels, size and row length, at most --sample-n images: conditional, a row of min(8,
    --sample-n // classes) per class (10 digits, 64: rows of 6), or, with fewer images than classes, one each of
    classes spread in order over them (200 classes made grids of 1,600); unconditional, no labels, 8 a row."""
    n, classes = run.args.sample_n, len(run.classes)
    if not run.args.cond:
        return None, n, 8
    per_class = min(8, n // classes)
    y = torch.arange(classes).repeat_interleave(per_class) if per_class else torch.arange(n) * classes // n
    return y.to(run.device), len(y), per_class or 8


def write_grid(run, step):
    y, n, nrow = grid_labels(run)
    folder = os.path.join(run.args.out, "samples")
    os.makedirs(folder, exist_ok=True)  # with the first grid: a start refused before it leaves no folder
    data.save_grid(ema_samples(run, n, y), os.path.join(folder, f"step_{step:07d}.png"), nrow=nrow)


def log_fid(run, step):
    """The FID of --fid-n EMA samples (conditional runs: uniformly drawn classes, unguided), into metrics.jsonl."""
    args = run.args
    g = torch.Generator().manual_seed(args.seed)
    y = torch.randint(len(run.classes), (args.fid_n,), generator=g).to(run.device) if args.cond else None
    try:
        value = run.fid_of(ema_samples(run, args.fid_n, y))
    except ValueError as e:  # no FID at this step (too few samples for a real square root, say): training goes on
        return log(f"step {step} | no FID: {e}")
    m = {"step": step, "fid": value, "fid_n": args.fid_n, "fid_ref": f"{args.fid_ref}: {run.fid_ref}",
         "fid_sampler": f"{ddpm.DEFAULT_SAMPLER} {run.sample_steps} steps"}
    record(run, m)
    log(f"step {step} | FID {value:.3f} (n = {args.fid_n}, EMA, {m['fid_sampler']}, against {args.fid_ref})")


def time_steps(run, share=0.015):
    """Seconds a training step takes: the run's first steps, taken (batch, gradient, optimizer, EMA) and timed after
    the first (a warm-up: allocations, torch.compile), then undone: weights, EMA, optimizer and scaler put back.
    As many as `share` of the budget holds (5 to 100): a handful ran 8% faster here than the steady rate. Every
    process takes them (DDP's all-reduce), as many as rank 0 says."""
    modules = (run.model, run.ema, run.optimizer, run.scaler)
    saved = [{k: v.to("cpu", copy=True) if torch.is_tensor(v) else copy.deepcopy(v) for k, v in m.state_dict().items()}
             for m in modules]  # (on the CPU: the device's memory was fitted to one copy)
    seconds, rank, calls = [], int(os.environ.get("RANK", "0")), torch.tensor([2], device=run.device)
    while len(seconds) < calls.item():
        step, began = len(seconds), time.perf_counter()
        with guarded(run, step, first=step == 0):
            train_step(run, *next_batch(run, step, rank), step).item()  # .item(): waits for a GPU
        seconds.append(time.perf_counter() - began)
        if step == 1:  # the warm-up and one step taken: how many more
            calls.fill_(1 + min(100, max(5, int(share * run.args.time / seconds[1]))))
            if run.world > 1:
                dist.broadcast(calls, 0)
    for m, state in zip(modules, saved):
        m.load_state_dict(state)
    run.first_bad.fill_(-1)
    return sum(seconds[1:]) / (len(seconds) - 1)


def plan_time(run):
    """--time: fix --steps before the first step, from the time a step takes (time_steps), a sample grid's and a
    checkpoint's, so that the lr plan and the EMA end with the budget; 2% of it is kept. Rank 0 plans for all."""
    args, step_s = run.args, time_steps(run)
    y, n, _ = grid_labels(run)  # a grid's time: one timed network evaluation on its images, times the sampler's steps
    x = torch.randn(min(n, CHUNK), args.channels, *run.size, device=run.device)
    t = torch.full((len(x),), args.T // 2, device=run.device)
    began = time.perf_counter()
    with torch.no_grad(), run.autocast:
        run.ema(x, t, None if y is None else y[:len(x)]).float().sum().item()
    grid, began = (time.perf_counter() - began) * run.sample_steps * math.ceil(n / CHUNK), time.perf_counter()
    torch.save([run.model.state_dict(), run.ema.state_dict()], io.BytesIO())
    save = 2 * (time.perf_counter() - began)  # a checkpoint holds as much again: Adam's two moments
    left = args.time * 0.98 - (time.time() - run.started) - grid - save  # the final grid and checkpoint
    per_step = step_s + (grid / args.sample_every if args.sample_every else 0) + save / args.ckpt_every
    planned = torch.tensor([float(max(1, int(left / per_step)))], device=run.device)
    if run.world > 1:  # rank 0's plan for every process
        dist.broadcast(planned, 0)
    args.steps = int(planned.item())
    return (f"--time {format_time(args.time)}: {step_s:.3g} s a step, {grid:.3g} s a grid, {save:.3g} s a checkpoint: "
            f"--steps {args.steps} (recorded in config.json; --resume trains to it)")


def report(run, done, loss, lr):
    """Every --log-every steps, a metrics.jsonl record and a log line of the mean loss over the whole batch since the
    last (every process calls this, and their losses are averaged); on a terminal, a progress line redrawn at most once
    a second. Only these read the loss from the device. img/s and the ETA count the time of the steps alone."""
    args, m, now, tty = run.args, run.meter, time.perf_counter(), sys.stdout.isatty()
    m.loss, m.n = m.loss + loss, m.n + 1
    rate = (done - m.first) * args.batch / m.steps_s
    eta = format_time((args.steps - done) * args.batch / max(rate, 1e-9))
    if done % args.log_every == 0 or done == args.steps:
        check_finite(run)
        rate, mean = m.n * args.batch / (m.steps_s - m.logged_s), m.loss.item() / m.n
        if run.world > 1:  # each process has its own share of the batch
            total = torch.tensor([mean], dtype=torch.float64, device=run.device)
            dist.all_reduce(total)
            mean = total.item() / run.world
        if run.master:
            record(run, {"step": done, "loss": mean, "lr": lr, "img_per_s": rate, "elapsed_s": now - m.t0})
        log(("\r" if tty else "") + f"step {done}/{args.steps} | loss {mean:.4f} | lr {lr:.2e} | {rate:.1f} img/s | ETA {eta}")
        m.loss, m.n, m.logged_s, m.drawn = 0.0, 0, m.steps_s, now
    elif tty and now - m.drawn >= 1:
        log(f"\rstep {done}/{args.steps} | loss {m.loss.item() / m.n:.4f} | {rate:.1f} img/s | ETA {eta}  ", end="")
        m.drawn = now


def between_steps(run, done, stop):
    """Rank 0's periodic work: a sample grid, an FID, a checkpoint. A signal interrupts sampling (minutes, it may be)
    and the step is saved at once."""
    args = run.args
    with stop.interruptible():
        if args.sample_every and done % args.sample_every == 0 and done != args.steps:
            write_grid(run, done)
        if args.fid_every and done % args.fid_every == 0:
            log_fid(run, done)
    if done % args.ckpt_every == 0 and done != args.steps and not stop.signal:
        checkpoint(run, done, stop)
    if args.snapshot and done == max(1, round(args.snapshot * args.steps)) != args.steps:  # autoguidance's weak one
        checkpoint(run, done, stop, os.path.join(args.out, "snapshot.pt"))
        log(f"step {done} | wrote {os.path.join(args.out, 'snapshot.pt')} (--snapshot {args.snapshot:g})")


def stopped_anywhere(run, stop):
    """Whether this process or (distributed) any other got a signal: every process must stop at the same step."""
    if run.world > 1:  # the signal's number, so that every process exits with 128 + it
        number = torch.tensor([getattr(signal, stop.signal) if stop.signal else 0], device=run.device)
        dist.all_reduce(number, dist.ReduceOp.MAX)
        if number.item() and not stop.signal:  # never cleared here: a signal may have come since
            stop.signal = signal.Signals(int(number.item())).name
    return stop.signal is not None


def warn_if_slow(run, done, seconds):
    """After the first step on a CPU: say so when the run would take more than a day."""
    args = run.args
    if run.device.type == "cpu" and (args.steps - done) * seconds > 86400:
        hint = "--model tiny or small trains in minutes here" if args.model == "paper" else "give fewer --steps"
        log(f"this run needs about {(args.steps - done) * seconds / 86400:.1f} days on this CPU; {hint}, or use a GPU")


def finish(run, done, stop, lock):
    """After the final checkpoint: unless stopped, the final sample grid (a signal now ends the process at once); a
    stopped run exits 128 + signal."""
    if run.master:
        if stop.signal:
            log(f"\nstopped by {stop.signal}: saved {run.ckpt_path} at step {done}; continue with --resume")
        else:
            write_grid(run, done)
            log(f"done: {run.ckpt_path} (step {done}), samples in {os.path.join(run.args.out, 'samples')}")
            weak = os.path.join(run.args.out, "snapshot.pt")
            if run.args.snapshot and os.path.exists(weak):
                log(f"autoguided samples (two network calls a step): python sample.py {run.ckpt_path} --autoguide "
                    f"{weak} --guidance 1")
        lock.close()
    if run.world > 1:  # a stopped process exits non-zero, and torchrun then ends the others: not before rank 0 is done
        dist.barrier()
        dist.destroy_process_group()
    if stop.signal:
        raise SystemExit(128 + getattr(signal, stop.signal))


def main(argv=None, started=None):
    """Train as the command line (or argv) says; --time counts from `started` (default: now)."""
    args, ckpt, init = parse_args(argv)
    made = []  # what the start creates in --out: train empties it once a step worked
    with Stop() as stop:
        try:
            train(args, ckpt, init, stop, started or time.time(), made)
        except (UserError, OSError) as e:  # OSError: a file of the run that is a folder, unreadable, a full disk
            said = str(e) if isinstance(e, UserError) else f"{e.filename or '--out ' + args.out}: {e.strerror or e}"
            data.Parser(prog="train.py").error(said)  # one line, exit status 2
        finally:
            unclaim(made)  # a start refused (or stopped) before its first step leaves --out as it was


def log_start(run, memory, plan):
    """The first lines: the data, the network, the batch and the machine; then what the run trains with, the classes
    its grids show (when not all), --time's plan and a warm-up that outlasts the run."""
    args, model, micro = run.args, run.model, run.args.batch // run.world // run.args.accum
    attention = " and ".join(filter(None, [", ".join(f"{h}x{w}" for h, w in model.attn_sizes), "the middle"]))
    log(f"{len(run.images)} images {args.channels}x{run.size[0]}x{run.size[1]}, {len(run.classes) or 'no'} classes | "
        f"{'--init' if args.init else args.model} network, {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M "
        f"parameters, GroupNorm of {model.norm_out.num_groups} groups{', AdaGN' if model.mid.block_1.scale_shift else ''}, attention at {attention} | batch {args.batch} = {run.world} process(es) x {args.accum} accumulation x {micro} | "
        f"{args.precision} on {run.device}, memory {memory}")
    log(recipe_line(args))
    y = grid_labels(run)[0]
    if args.cond and len(y) < len(run.classes):
        shown = [run.classes[i] for i in y.tolist()]
        log(f"sample grids show {len(y)} of the {len(run.classes)} classes, one image each, spread in order: "
            f"{', '.join(shown[:3])}, ..., {shown[-1]} (--sample-n {args.sample_n}; give {len(run.classes)} for all)")
    if run.fid_of:
        log(f"FID every {args.fid_every} steps: {args.fid_n} EMA samples against {args.fid_ref}, {run.fid_ref}")
        if run.fid_warning:
            log(f"warning: {run.fid_warning}")
    if plan:
        log(plan)
    warn_if_warmup_outlasts(args)


def recipe_line(args):
    """Target, schedule, loss (and DDPM-IP's gamma), T, the learning-rate plan, EMA and batch; each value the --model preset chose (no flag,
    --config or checkpoint gave it) marked so, as a user of another preset's defaults would not expect it."""
    def marked(key, text):
        return f"{text} ({args.model} preset)" if key in args.from_preset else text
    plan = f"cosine to {args.lr_min:g}" if args.cosine else "constant"
    perturbed = f", input perturbation {args.input_perturbation:g}" if args.input_perturbation else ""
    perturbed += "" if args.t_density == "uniform" else marked("t_density", f", ln sigma_t ~ N({args.t_density})")
    ema = f"EMA of length {args.ema_length:g} (power function)" if args.ema_length else \
        marked("ema", f"EMA {args.ema:g}")
    return (f"{marked('target', f'{args.target} target')}, {marked('schedule', f'{args.schedule} schedule')}, "
            f"{args.loss} loss{perturbed}, T {args.T} | lr {marked('lr', f'{args.lr:g}')} after "
            f"{marked('warmup', f'{args.warmup} warm-up steps')}, then {marked('cosine', plan)} | "
            f"{ema} | {marked('batch', f'batch {args.batch}')}" +
            (f" | {marked('snapshot', f'snapshot at {args.snapshot:g}')}" if args.snapshot else ""))


def warn_if_warmup_outlasts(args):
    """Say so when the linear warm-up does not end before the run does (--time: once its steps are planned): the
    learning rate never reaches --lr (Ho et al.'s 5000 steps in a 40-step run: 0.8% of it)."""
    if args.warmup >= args.steps:
        peak = learning_rate(args, args.steps - 1)
        preset = f" (the {args.model} preset's)" if "warmup" in args.from_preset else ""
        log(f"warning: --warmup {args.warmup}{preset} outlasts the run's {args.steps} steps: the learning rate reaches "
            f"{peak:.3g}, not --lr {args.lr:g}; give --warmup {args.steps // 10}, say (a tenth of the run)")


def train(args, ckpt, init, stop, started, made):
    """Algorithm 1 of Ho et al.: repeat { x_0 ~ q(x_0), t ~ Uniform({1, ..., T}), eps ~ N(0, I); take a gradient
    step on ||eps - eps_theta(sqrt(alpha-bar_t) x_0 + sqrt(1 - alpha-bar_t) eps, t)||^2 } for --steps (or --time).
    `made` lists what the start creates in --out until a step worked (main removes it if the start ends before)."""
    device, rank, world = setup_device(args)
    if rank:
        sys.stdout = open(os.devnull, "w")  # rank 0 alone logs
    lock = claim_run_folder(args.out, ckpt is not None, made) if rank == 0 else None
    run = setup_run(args, ckpt, init, device, rank, world, started)
    start = done = ckpt["step"] if ckpt else 0
    memory = fit_memory(run)
    plan = plan_time(run) if args.time and not ckpt else None  # --steps from the budget: the lr plan and EMA need it
    log_start(run, memory, plan)
    run.meter = Meter(first=start)
    with stop.deferring():  # from here a signal stops the loop after the step in flight
        for step in range(start, args.steps):
            began = time.perf_counter()
            lr = learning_rate(args, step)  # lr, data and randomness are functions of the step: exact resume
            for group in run.optimizer.param_groups:
                group["lr"] = lr
            x0, y = next_batch(run, step, rank)  # x_0 ~ q(x_0), and its labels
            with guarded(run, step, first=step == start):
                loss = train_step(run, x0, y, step)  # t, eps, the loss, its gradient, the EMA
            run.meter.steps_s += time.perf_counter() - began  # img/s and the ETA count the steps alone (report)
            done = step + 1
            if done == start + 1:  # config.json and metrics.jsonl wait for a step that worked
                made.clear()
                warn_if_slow(run, done, time.perf_counter() - run.meter.t0)
                if run.master:
                    open_metrics(run, start)
            report(run, done, loss, lr)
            if run.master:
                between_steps(run, done, stop)
            if stopped_anywhere(run, stop):
                break
        if run.master:
            checkpoint(run, done, stop)  # the final one
    finish(run, done, stop, lock)


if __name__ == "__main__":
    main(started=STARTED)
