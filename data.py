"""Files to tensors and back, for train.py and sample.py: image folders decoded once into a memory-mapped cache,
the built-in `shapes`, batches, PNGs and grids written atomically, and the checkpoint file (written, loaded without
running code, its network rebuilt), and diffusers DDPM folders, the paper's released weights, read as one and written.
Also what the two command lines share: UserError and one-line errors, argparse types, the device's checks and precision.

    images, labels, classes = load_dataset("./images", (32, 32))   # uint8 [N, C, 32, 32], cached in ~/.cache
    x0 = batch_images(images, batch_indices(step, 64, len(images), seed=0), device, flip=True)  # [-1, 1]
    model, diffusion = build(load_checkpoint("runs/run/ckpt.pt"))

Depends on torch, numpy and Pillow; ddpm.py and unet.py for rebuilding a checkpoint's network.
"""
import argparse
import collections
import concurrent.futures
import contextlib
import errno
import fcntl
import functools
import glob
import hashlib
import itertools
import json
import math
import os
import re
import shutil
import sys
import tempfile
import time
import warnings
import zipfile

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageOps

import ddpm
import unet


class UserError(ValueError):
    """A problem the user can fix (a flag, a file, a folder): each program prints it as one line and exits with 2."""


# --- the two command lines' shared pieces: one-line errors, argparse types, the machine -------------------------------
class Parser(argparse.ArgumentParser):
    """argparse with one-line errors ("sample.py: error: argument --eta: ..."), exit status 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n".replace("\n", "\\n", message.count("\n")))


def only_used_with(flag, other):
    """The one sentence both programs refuse a flag with that serves another flag not given."""
    return f"{flag} is only used with {other}"


def number(kind, interval):
    """An argparse type: a finite `kind` (int or float) within `interval`, written like "[0, 1)" or "(0, inf)"."""
    low, high = (float(v) for v in interval[1:-1].split(","))

    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}") from None
        if not (math.isfinite(value) and (value > low if interval[0] == "(" else value >= low)
                and (value < high if interval[-1] == ")" else value <= high)):
            raise argparse.ArgumentTypeError(f"{text} is not in {interval}")
        return value
    return parse


def one_line(error, last=False):
    """The first (or last: where torch puts the cause) line of an exception's message, for a one-line error."""
    lines = str(error).strip().splitlines() or [type(error).__name__]
    return (lines[-1] if last else lines[0]).strip()[:200]


def out_of_memory(error):
    return isinstance(error, torch.cuda.OutOfMemoryError) or "can't allocate memory" in str(error)  # CUDA's, a CPU's


def path(text):
    """An argparse type for paths: an empty one would quietly mean the current folder, or nothing."""
    if not text:
        raise argparse.ArgumentTypeError("an empty path")
    return text


def check_device(name):
    """Raise UserError unless torch knows the device `name` (None: the default) and this machine has it."""
    try:
        device = torch.device("cpu" if name is None else name)
    except RuntimeError:
        raise UserError(f"--device {name}: not a device name (cpu, cuda, cuda:1, mps, ...)") from None
    api = getattr(torch, device.type, None)  # torch.cuda, torch.mps, ...
    if device.type != "cpu" and not (api and api.is_available() and (device.index or 0) < api.device_count()):
        raise UserError(f"--device {name}: this machine has no such device; leave --device out to use what it has")


def fastest_precision(device):
    """'bf16' where autocast to bf16 is faster than fp32 on this device, else 'fp32': on CUDA any GPU with bf16; on a
    CPU it depends (AVX512-BF16/AMX: bf16 wins; AVX2: ~50x slower), so one convolution is timed both ways."""
    device = torch.device(device)
    if device.type != "cpu":
        return "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    conv, x = torch.nn.Conv2d(64, 64, 3, padding=1), torch.randn(8, 64, 16, 16)
    seconds, threads = {"fp32": math.inf, "bf16": math.inf}, torch.get_num_threads()
    torch.set_num_threads(1)  # threads that wait for each other time the scheduler on a busy machine, not the ISA
    try:
        for turn in range(10):  # taking turns, best of ten: a busy machine slows some tries, not a whole side
            for name in seconds:
                with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=name == "bf16"):
                    conv(x)  # warm-up
                    start = time.perf_counter()
                    conv(x)
                    seconds[name] = min(seconds[name], time.perf_counter() - start)
            if turn >= 2 and seconds["bf16"] > 4 * seconds["fp32"]:  # AVX2: decided, and each bf16 try is slow
                break
    finally:
        torch.set_num_threads(threads)
    return "bf16" if seconds["bf16"] < seconds["fp32"] else "fp32"


def format_time(seconds):
    m, s = divmod(int(seconds), 60)
    return f"{m // 60}h{m % 60:02d}m" if m >= 60 else f"{m}m{s:02d}s"


def log(*parts, end="\n"):
    """print, except that a closed stdout (`| head`, a lost terminal) never stops training: metrics.jsonl remains."""
    try:
        print(*parts, end=end, flush=True)
    except OSError:  # BrokenPipeError, or EIO from a hung-up terminal
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


# --- image files and the built-in dataset -----------------------------------------------------------------------------
IMAGE_EXTS = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".gif"}  # what counts as an image file


def read_image(path, size, resample=Image.Resampling.LANCZOS):
    """An image file as uint8 [H, W, 3]: EXIF orientation, first frame, 16-bit grey to 8 bits, alpha on white, resized
    on the shorter side, centre-cropped to size (H, W); UserError unless a regular decodable file (never a FIFO)."""
    if not os.path.isfile(path):
        raise UserError(f"{path}: {'not an image file' if os.path.exists(path) else 'no such file'}")
    try:
        with Image.open(path) as im:  # Pillow refuses over twice its pixel limit and only warns below: refused here
            if Image.MAX_IMAGE_PIXELS and im.width * im.height > Image.MAX_IMAGE_PIXELS:
                raise UserError(f"{im.width}x{im.height} pixels, over Pillow's decompression-bomb limit")
            im.draft("RGB", (size[1], size[0]))  # JPEG: decode at the smallest scale that still covers the size
            kind, im = im.format, ImageOps.exif_transpose(im)  # a transposed copy has no format
            if im.mode == "F" or (im.mode == "I" and kind == "TIFF"):  # I is 16 bits in a PGM, a PNG in Pillow 10.0
                raise UserError("32-bit pixels (float or integer) have no standard range; save it with 8 or 16 bits")
            if im.mode in ("I", "I;16", "I;16B", "I;16L"):  # 16 bits to 8; a transparent grey value becomes alpha
                grey, transparent = np.asarray(im, np.float64), im.info.get("transparency")
                im = Image.fromarray((grey / 257).clip(0, 255).astype(np.uint8))
                if transparent is not None:
                    im.putalpha(Image.fromarray(((grey != transparent) * 255).astype(np.uint8)))
            if im.mode in ("RGBA", "LA", "PA") or "transparency" in im.info:
                im = Image.alpha_composite(Image.new("RGBA", im.size, (255, 255, 255, 255)), im.convert("RGBA"))
            return np.array(ImageOps.fit(im.convert("RGB"), (size[1], size[0]), resample))  # writable: asarray's is not
    except Exception as e:  # Pillow raises many kinds for a broken file; each is a one-line refusal
        raise UserError(f"{path}: not a readable image ({type(e).__name__}: {e})") from None


def find_images(root):
    """Image files under root, sorted, following links to folders outside root once (one inside is read under its own
    name). Regular files only (a FIFO would block); hidden names (.ipynb_checkpoints/, ._x.png) are skipped, as by ls."""
    found, seen, top = [], set(), os.path.join(os.path.realpath(root), "")
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen:  # a symlink loop, or a folder linked twice
            dirnames.clear()
            continue
        seen.add(real)
        folders = [os.path.join(dirpath, d) for d in dirnames]
        dirnames[:] = sorted(d for d, f in zip(dirnames, folders) if not d.startswith(".") and
                             not (os.path.islink(f) and os.path.join(os.path.realpath(f), "").startswith(top)))
        paths = (os.path.join(dirpath, f) for f in filenames
                 if not f.startswith(".") and os.path.splitext(f)[1].lower() in IMAGE_EXTS)
        found += filter(os.path.isfile, paths)
    return sorted(found)


def class_labels(root, paths, cond):
    """Each path's label (the index of its first-level subfolder, sorted) and the class names; all 0 without cond."""
    if not cond:
        return np.zeros(len(paths), np.int64), []
    tops = [os.path.relpath(p, root).split(os.sep) for p in paths]
    classes = sorted({t[0] for t in tops if len(t) > 1})
    if len(classes) < 2:
        raise UserError(f"--cond: --data {root} needs at least two class subfolders, found {len(classes)}")
    loose = [p for p, t in zip(paths, tops) if len(t) == 1]
    if loose:
        raise UserError(f"--cond: {loose[0]} is not inside a class subfolder of {root}; move it into one")
    index = {c: i for i, c in enumerate(classes)}  # a dict: a list's index() would be slow with many classes
    return np.array([index[t[0]] for t in tops], np.int64), classes


SHAPES = ("circle", "square", "triangle", "cross")
PALETTE = np.array([(230, 40, 40), (40, 200, 60), (50, 100, 240), (240, 210, 40), (220, 60, 220), (40, 210, 220)])


def make_shapes(n, size):
    """The built-in dataset, learned in minutes: uint8 [n, H, W, 3], a bright shape on dark, and its index."""
    h, w = size
    rng = np.random.default_rng(0)  # the same dataset in every run and process
    images, labels = np.empty((n, h, w, 3), np.uint8), rng.integers(0, len(SHAPES), n)
    for i in range(n):
        bg = tuple(int(c) for c in rng.integers(0, 70, 3))
        colour = tuple(int(c) for c in np.clip(PALETTE[rng.integers(len(PALETTE))] + rng.integers(-25, 26, 3), 0, 255))
        im = Image.new("RGB", (4 * w, 4 * h), bg)
        r = rng.uniform(0.22, 0.4) * 4 * min(h, w)
        x, y = rng.uniform(r, 4 * w - r), rng.uniform(r, 4 * h - r)
        draw, s, t = ImageDraw.Draw(im), r * 0.85, r * 0.3
        if labels[i] == 0:
            draw.ellipse([x - r, y - r, x + r, y + r], fill=colour)
        elif labels[i] == 1:
            draw.rectangle([x - s, y - s, x + s, y + s], fill=colour)
        elif labels[i] == 2:
            draw.polygon([(x, y - r), (x - r * 0.95, y + r * 0.75), (x + r * 0.95, y + r * 0.75)], fill=colour)
        else:
            draw.rectangle([x - r, y - t, x + r, y + t], fill=colour)
            draw.rectangle([x - t, y - r, x + t, y + r], fill=colour)
        images[i] = np.asarray(im.resize((w, h), Image.Resampling.LANCZOS))
    return images, labels


# --- the decoded-image cache: each image decoded once, memory-mapped by every process ---------------------------------
NAMED = 20  # unreadable image files named one a line; the rest are counted


def decode_into(f, root, paths, size):
    """Decode paths in threads (Pillow releases the GIL), a few images ahead per thread, into the open file f as a .npy
    of uint8 [N, 3, H, W]. Returns the indices of the readable paths, whether all of them are grey, and the errors of
    the others."""
    fcntl.flock(f, fcntl.LOCK_EX)  # held until f closes, however the process ends: remove_orphans skips f
    n, workers, lead = len(paths), os.cpu_count() or 1, "\r" if sys.stdout.isatty() else ""
    header = {"descr": "|u1", "fortran_order": False, "shape": (n, 3, *size)}
    np.lib.format.write_array_header_1_0(f, header)  # numpy pads it: any smaller count fits in place later
    keep, bad, grey, t0 = [], [], True, time.perf_counter()
    shown = t0
    with warnings.catch_warnings(), concurrent.futures.ThreadPoolExecutor(workers) as pool:
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # read_image refuses bombs, in one line
        futures = (pool.submit(read_image, p, size) for p in paths)
        ahead = collections.deque(itertools.islice(futures, 4 * workers))
        for i in range(n):
            ahead.extend(itertools.islice(futures, 1))
            try:
                image = ahead.popleft().result()
                f.write(np.ascontiguousarray(image.transpose(2, 0, 1)))
                keep.append(i)
                grey = grey and bool((image[..., :1] == image[..., 1:]).all())
            except ValueError as e:  # an unreadable file is skipped, never a crash
                bad.append(str(e))
            now = time.perf_counter()
            if now - shown > (0.5 if lead else 30) or i == n - 1:  # a line redrawn on a terminal, else every 30 s
                shown, rate = now, (i + 1) / max(now - t0, 1e-9)
                log(f"{lead}decoded {i + 1}/{n} images | {rate:.0f} images/s | ETA {format_time((n - i - 1) / rate)}  ",
                    end="" if lead and i < n - 1 else "\n")
    if bad:
        log_unreadable(bad, len(bad), n)
    if not keep:
        raise UserError(f"--data {root}: none of the {n} image files could be read")
    f.seek(0)
    np.lib.format.write_array_header_1_0(f, {**header, "shape": (len(keep), 3, *size)})
    return keep, grey, bad


def log_unreadable(errors, count, n):
    """Name the count skipped files of n, NAMED of them (read_image's errors start with the path), and count the rest:
    one file named per run would take a run per broken file to find them all."""
    shown = errors[:NAMED]
    more = [f"  ... and {count - len(shown)} more"] if count > len(shown) else []
    log("\n".join([f"skipped {count} unreadable image file(s) of {n}:", *(f"  {e}" for e in shown), *more]))


def cache_stem(root, paths, size):
    """The cache's path less its extension, keyed by every file's name, size and mtime (rsync's quick check; not ctime,
    which a copy renews), under $XDG_CACHE_HOME (if absolute, as the XDG spec says) or ~/.cache."""
    stats = [(p, st.st_size, st.st_mtime_ns) for p in paths for st in (os.stat(p),)]
    key = hashlib.sha256(json.dumps([root, size, stats]).encode()).hexdigest()[:20]
    cache = os.environ.get("XDG_CACHE_HOME", "")
    cache = cache if os.path.isabs(cache) else os.path.expanduser("~/.cache")
    return os.path.join(cache, "ddpm-toolkit", f"data-{key}")


def remove_orphans(stem):
    """Delete what killed decodes left beside stem: files a minute old that no live decoder holds locked."""
    for old in filter(os.path.isfile, glob.glob(glob.escape(os.path.dirname(stem)) + "/data-*.tmp")):  # not a FIFO
        with contextlib.suppress(OSError), open(old, "rb") as f:
            if time.time() - os.fstat(f.fileno()).st_mtime > 60:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)  # an OSError while its decoder lives
                os.remove(old)


def remove_stale_caches(stem, source, started):
    """Delete the caches of earlier states of this source (folder and size): those written before this decode started
    (a later one may be of a newer state)."""
    for other in filter(os.path.isfile, glob.glob(glob.escape(os.path.dirname(stem)) + "/data-*.json")):  # not a FIFO
        with contextlib.suppress(OSError, ValueError, AttributeError, TypeError), open(other) as f:
            earlier = other != stem + ".json" and os.fstat(f.fileno()).st_mtime < started
            if earlier and (json.load(f).get("source") or [])[:2] == source:  # [:2]: older caches add --cond
                os.remove(other)  # first: a cache without its .json is never trusted
                os.remove(other[:-len(".json")] + ".npy")
                log(f"removed {other[:-len('.json')]}.npy, the image cache of an earlier state of {source[0]}")


def read_cache(stem, size, n):
    """The mapped images and metadata of a complete cache of n files, or None; a damaged one is said and ignored."""
    if not os.path.exists(stem + ".json"):  # written last: an interrupted decode has none
        return None
    try:
        with open(stem + ".json") as f:
            meta = json.load(f)
        images, keep = np.load(stem + ".npy", mmap_mode="c"), meta["keep"]
        if keep != sorted({i for i in keep if type(i) is int and 0 <= i < n}) or type(meta["grey"]) is not bool or \
                type(meta.get("unreadable", [])) is not list:
            raise ValueError("its metadata is not what a decode writes")
        if images.shape != (len(keep), 3, *size) or images.dtype != np.uint8:
            raise ValueError(f"{images.dtype} {list(images.shape)} for {len(keep)} images")
        return images, meta
    except (OSError, ValueError, EOFError, KeyError, TypeError) as e:
        log(f"cache {stem}.npy is unreadable ({type(e).__name__}: {e}); decoding again")


def decode(root, paths, size, stem):
    """Decode into the cache stem.npy, then stem.json (written last: it makes the cache trusted); with no cache or an
    unwritable one, into an unnamed temporary file. Returns the mapped images and the metadata."""
    if stem:
        try:
            started = time.time()
            os.makedirs(os.path.dirname(stem), exist_ok=True)
            keep, grey, bad = write_atomically(stem + ".npy", lambda f: decode_into(f, root, paths, size))
            meta = {"keep": keep, "grey": grey, "unreadable": bad[:NAMED], "source": [root, list(size)]}
            write_atomically(stem + ".json", lambda f: f.write(json.dumps(meta).encode()))
            remove_stale_caches(stem, meta["source"], started)
            return np.load(stem + ".npy", mmap_mode="c"), meta  # copy-on-write: never written, one shared page cache
        except OSError as e:
            log(f"warning: cannot write the image cache {stem}.npy ({e}); decoding into a temporary file instead")
    try:
        with tempfile.TemporaryFile() as f:  # unnamed: nothing is left behind, however the process ends
            keep, grey, _ = decode_into(f, root, paths, size)
            f.seek(0)
            np.lib.format.read_magic(f)
            np.lib.format.read_array_header_1_0(f)  # leaves f at the first image
            return np.memmap(f, np.uint8, "c", f.tell(), (len(keep), 3, *size)), {"keep": keep, "grey": grey}
    except OSError as e:
        raise UserError(f"cannot write the decoded images to {tempfile.gettempdir()} ({e}); free space there or set TMPDIR")


def load_dataset(data, size, cond=False, channels=None, cache=True):
    """The training images of folder `data` (or "shapes", the built-in set) at size (H, W) as uint8 [N, C, H, W], their
    labels [N] and class names (the first-level subfolders with cond, else none). C: `channels`, or 1 where every image
    is grey, else 3. A folder is decoded once into a cache file (cache=False: a temporary one) that every process
    maps: a machine's processes share one copy in the page cache, and a batch reads only its own images."""
    if data == "shapes":
        images, labels = make_shapes(8192, size)
        images, classes, grey = images.transpose(0, 3, 1, 2).copy(), list(SHAPES) if cond else [], False
    else:
        root = os.path.abspath(data)
        paths = find_images(root)  # the caller made sure it is a folder
        if not paths:
            raise UserError(f"--data {root}: no images found (looked for {', '.join(sorted(IMAGE_EXTS))}, recursively)")
        labels, classes = class_labels(root, paths, cond)  # before decoding: a bad layout fails at once
        stem = cache_stem(root, paths, size) if cache else None
        if stem:
            remove_orphans(stem)  # also when the cache is found
        cached = stem and read_cache(stem, size, len(paths))
        images, meta = cached or decode(root, paths, size, stem)
        if cached and len(meta["keep"]) < len(paths):  # a decode names them as it finds them
            log_unreadable(meta.get("unreadable", []), len(paths) - len(meta["keep"]), len(paths))  # (older: none)
        labels, grey = labels[meta["keep"]], meta["grey"]
        unread = [c for c, n in zip(classes, np.bincount(labels, minlength=len(classes))) if not n]
        if unread:
            raise UserError(f"--cond: none of the images of class folder(s) {', '.join(unread)} in {root} could be read; replace "
                 "them or remove the folder(s)")
        others = sorted({d for d in next(os.walk(root))[1] if d[0] != "."} - set(classes)) if cond else []
        if others:
            log(f"--cond: {', '.join(others)} in {root} hold no images of their own (links into --data are skipped)")
    # a grey image is one of its three equal planes (a view); colour stays three planes (--channels 1: batch_images)
    images = torch.from_numpy(images)[:, :1 if grey and channels != 3 else 3]
    return images, torch.as_tensor(labels, dtype=torch.int64), classes


# --- batches ----------------------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=2)
def epoch_order(n, seed, epoch):
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))


def batch_indices(step, batch, n, seed):
    """A step's global batch: positions [step*batch, (step+1)*batch) of per-epoch permutations (resume is exact)."""
    positions = torch.arange(step * batch, (step + 1) * batch)
    epochs = positions // n
    return torch.cat([epoch_order(n, seed, int(e))[positions[epochs == e] % n] for e in epochs.unique()])


def batch_images(images, idx, device, flip, channels=None):
    """uint8 images[idx] -> [-1, 1] on device, mirrored with probability 1/2 if flip; for channels=1, colour as luma."""
    x0 = images[idx]  # reads only these images from the memory map
    x0 = (x0.pin_memory() if device.type == "cuda" else x0).to(device, non_blocking=True)  # pinned: an async copy
    if flip:  # on uint8: a quarter of the bytes to move, the same result
        mirror = torch.rand(len(idx), device=device) < 0.5
        x0 = torch.where(mirror[:, None, None, None], x0.flip(3), x0)
    if channels == 1 and x0.shape[1] == 3:  # ITU-R 601-2 luma in Pillow's fixed point: exactly its convert("L")
        luma = torch.tensor([19595, 38470, 7471], device=device).view(1, 3, 1, 1)
        x0 = ((x0.int() * luma).sum(1, keepdim=True) + 0x8000) >> 16
    return x0.float().div_(127.5).sub_(1)


# --- writing files: atomically, PNGs and grids ------------------------------------------------------------------------
def write_atomically(path, write, tmp=None):
    """write(f) to a temporary file beside path (`tmp`, or PATH.<random>.tmp: a link at path is written through),
    flushed, then renamed to path: no reader sees part of a file."""
    if tmp is None:  # not mkstemp's file, which is private (0600): a written file gets the umask's mode
        path = os.path.realpath(path)
        tmp = f"{path}.{os.getpid()}{os.urandom(4).hex()}.tmp"
    try:
        with open(tmp, "wb") as f:
            result = write(f)
            f.flush()
            try:
                os.fsync(f.fileno())
            except OSError as e:  # a file system without fsync: the rename still keeps readers from a partial file
                if e.errno not in (errno.EINVAL, errno.ENOTSUP):
                    raise
        os.replace(tmp, path)
        return result
    except OSError as e:  # a full disk, say: named by the file it was for, not the temporary one
        raise OSError(e.errno, e.strerror or str(e), path) from None
    finally:  # an error removes the temporary file; a kill leaves it, under a name nothing reads
        if os.path.lexists(tmp):
            os.remove(tmp)


def to_uint8(x):
    """[N, C, H, W] in [-1, 1] -> uint8 numpy [N, H, W, C]."""
    return ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def grid_image(x, nrow=8, pad=2, scale=1, labels=None):
    """Images [N, C, H, W] in [-1, 1] as one Pillow image on white, nrow a row (fewer images: one row of them), each
    enlarged `scale` times (nearest neighbour: pixels stay pixels); `labels` captions the columns."""
    images = to_uint8(x).repeat(scale, 1).repeat(scale, 2)
    n, h, w, c = images.shape
    if not n or nrow < 1:
        raise ValueError(f"a grid of {n} images, {nrow} a row: give at least one of each")
    nrow = min(nrow, n)
    top = 12 if labels else 0
    grid = np.full((top + math.ceil(n / nrow) * (h + pad) + pad, nrow * (w + pad) + pad, c), 255, np.uint8)
    for i, im in enumerate(images):
        row, left = top + pad + i // nrow * (h + pad), pad + i % nrow * (w + pad)
        grid[row:row + h, left:left + w] = im
    picture = Image.fromarray(grid[..., 0] if c == 1 else grid)
    draw = ImageDraw.Draw(picture)
    for k, text in enumerate(labels or []):
        draw.text((pad + k * (w + pad), 1), text, fill=0)
    return picture


def save_grid(x, path, nrow=8):
    save_png(grid_image(x, nrow), path)


def save_png(image, path):
    """A Pillow image as a PNG file, written atomically: a full disk or a kill leaves no broken file."""
    write_atomically(path, lambda f: image.save(f, format="PNG"))


# --- the checkpoint ---------------------------------------------------------------------------------------------------
# The checkpoint, one dict of plain types and tensors (torch.load weights_only). format 2: attention's dense
# layers stored 2-D. Training adds the optimizer and scaler states, which sampling does not need.
FORMAT = 2
CHECKPOINT_KEYS = {"format": int, "step": int, "config": dict, "model_config": dict, "diffusion": dict,  # and types
                   "classes": (list, tuple), "model": dict, "ema": dict}


def checkpoint_state(step, config, model_config, diffusion, classes, model, ema, optimizer, scaler, images,
                     variance=None):
    """CHECKPOINT_KEYS, the training state, the number of training images (--resume says if --data changed) and the
    ddpm sampler's variance where a diffusers scheduler the run started from chose one (else None: beta)."""
    return dict(format=FORMAT, step=step, config=config, model_config=model_config, diffusion=diffusion.config(),
                classes=classes, model=model.state_dict(), ema=ema.state_dict(), optimizer=optimizer.state_dict(),
                scaler=scaler.state_dict(), images=images, variance=variance)


def load_checkpoint(path):
    """A train.py checkpoint as a dict, loaded running no code from it (weights_only); UserError if it is unusable."""
    if not os.path.isfile(path):
        what = "a folder, not a checkpoint file" if os.path.isdir(path) else "not a regular file" if \
            os.path.exists(path) else "a link to a missing file" if os.path.islink(path) else "no such checkpoint file"
        raise UserError(f"{path}: {what} (train.py writes RUN_DIR/ckpt.pt)")
    try:
        with open(path, "rb") as f:  # torch.save writes a zip: header first, directory last (a cut one has none)
            if f.read(4) in (b"", b"PK\x03\x04") and not zipfile.is_zipfile(f):  # torch's error varies with the cut
                raise EOFError
        with warnings.catch_warnings():  # torch warns about unusual pickles, a second line
            warnings.simplefilter("ignore")
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, not a torch file at all, a pickle that wants code
        first = one_line(e).split(". ")[0]  # (torch's next sentences advise weights_only=False: never here)
        if "Unsupported global" in str(e) or "Unsupported class" in str(e):  # (torch < 2.4 says class)
            first = "it holds Python objects, not only tensors and settings (a whole model, or code); none was run"
        elif first.startswith("Weights only load failed") or isinstance(e, KeyError):  # bytes no pickle has
            first = "damaged, or not a file torch.save wrote"
        elif isinstance(e, EOFError) or "central directory" in first:  # a zip's directory is at its end
            first = "empty or cut short: a partial copy or download?"
        raise UserError(f"{path}: not a loadable checkpoint ({first})") from None
    missing = [k for k in CHECKPOINT_KEYS if not isinstance(ckpt, dict) or k not in ckpt]
    if missing:
        raise UserError(f"{path}: not a train.py checkpoint (missing {', '.join(missing)})")
    wrong = [k for k, kind in CHECKPOINT_KEYS.items() if not isinstance(ckpt[k], kind) or isinstance(ckpt[k], bool)]
    if wrong:
        raise UserError(f"{path}: not a train.py checkpoint (its {wrong[0]} is a {type(ckpt[wrong[0]]).__name__})")
    if ckpt["format"] not in (1, FORMAT):  # 1: attention's dense layers as 1x1 convolutions (unet.AttnBlock)
        raise UserError(f"{path}: checkpoint format {ckpt['format']!r}, not 1 or {FORMAT}: written by another version")
    broken = [f"{part}.{name}" for part in ("model", "ema") for name, w in ckpt[part].items()
              if torch.is_tensor(w) and w.is_floating_point() and not torch.isfinite(w).all()]
    if broken:
        raise UserError(f"{path}: non-finite weights in {broken[0]} ({len(broken)} tensors): a diverged run; "
                         "use an earlier checkpoint")
    return ckpt


def load(path):
    """A train.py checkpoint file, or a diffusers DDPM folder (load_diffusers), as a checkpoint dict."""
    return load_diffusers(path) if os.path.isdir(path) else load_checkpoint(path)


def build(ckpt, ema=True, device="cpu"):
    """A checkpoint's network (EMA or raw weights, eval mode) and Diffusion; UserError if they do not build or fit."""
    try:
        model, diffusion = unet.UNet(**ckpt["model_config"]), ddpm.Diffusion(**ckpt["diffusion"])
    except (TypeError, ValueError, RuntimeError) as e:
        raise UserError(f"checkpoint: its configuration does not build a network here ({e})") from None
    try:
        model.load_state_dict(ckpt["ema" if ema else "model"])
    except RuntimeError as e:  # its first line only says "Error(s) in loading state_dict"
        raise UserError(f"checkpoint weights do not fit its own configuration ({one_line(e, last=True)})") from None
    return model.to(device).eval(), diffusion.to(device)


# --- diffusers folders: Ho et al.'s released weights (google/ddpm-cifar10-32, google/ddpm-church-256, ...) -----------
# A diffusers DDPM folder holds model_index.json, unet/ (config.json, UNet2DModel's settings, and the weights,
# diffusion_pytorch_model.safetensors or .bin) and scheduler/scheduler_config.json (the diffusion); a bare UNet2DModel
# folder, its config.json and weights. UNet2DModel with UNET2D_FIXED's settings is unet.UNet under other weight names:
# flip_sin_to_cos false and freq_shift 1 make its timestep embedding unet.timestep_embedding, downsample_padding 0 pads
# bottom and right as unet.Resample does, attention has one head, and its up_blocks run from the lowest resolution up.
# tests/test_diffusers.py compares the outputs with those of diffusers 0.42 itself.
DIFFUSERS_VERSION = "0.42.1"  # written into exported configs: the version whose files the loader was checked against
UNET2D_FIXED = {  # {setting: (diffusers' default, where an older config omits it; the value of Ho et al.'s network)}
    "act_fn": ("silu", "silu"), "add_attention": (True, True), "attention_head_dim": (8, None),  # None: one head
    "attn_norm_num_groups": (None, None), "center_input_sample": (False, False), "class_embed_type": (None, None),
    "downsample_padding": (1, 0), "downsample_type": ("conv", "conv"), "flip_sin_to_cos": (True, False),
    "freq_shift": (0, 1), "mid_block_scale_factor": (1, 1), "mid_block_type": ("UNetMidBlock2D", "UNetMidBlock2D"),
    "norm_eps": (1e-5, 1e-6), "norm_num_groups": (32, 32), "num_class_embeds": (None, None),
    "resnet_time_scale_shift": ("default", "default"), "time_embedding_dim": (None, None),
    "time_embedding_type": ("positional", "positional"), "upsample_type": ("conv", "conv")}
DIFFUSERS_NAMES = [  # unet.UNet's weight names -> UNet2DModel's, in order (diffusers_names renumbers up.i first)
    (r"^temb\.0\.", "time_embedding.linear_1."), (r"^temb\.2\.", "time_embedding.linear_2."),
    (r"^norm_out\.", "conv_norm_out."), (r"^mid\.block_1\.", "mid_block.resnets.0."),
    (r"^mid\.block_2\.", "mid_block.resnets.1."), (r"^mid\.attn_1\.", "mid_block.attentions.0."),
    (r"^(down|up)\.(\d+)\.block\.", r"\1_blocks.\2.resnets."),
    (r"^(down|up)\.(\d+)\.attn\.", r"\1_blocks.\2.attentions."),
    (r"^(down|up)\.(\d+)\.\1sample\.", r"\1_blocks.\2.\1samplers.0."), (r"\.temb_proj\.", ".time_emb_proj."),
    (r"\.nin_shortcut\.", ".conv_shortcut."), (r"\.norm\.", ".group_norm."), (r"\.proj_out\.", ".to_out.0.")]
OLD_ATTENTION = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}  # diffusers < 0.15's names
SCHEDULES = {"linear": "linear", "squaredcos_cap_v2": "cosine"}  # beta_schedule -> ddpm.beta_schedule's name
TARGETS = {"epsilon": "eps", "sample": "x0", "v_prediction": "v"}  # prediction_type -> Diffusion's target
VARIANCES = {"fixed_small": "beta_tilde", "fixed_small_log": "beta_tilde", "fixed_large": "beta"}  # -> sample.py's
SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def diffusers_names(name, levels):
    """unet.UNet's weight `name` -> its UNet2DModel name(s), in a network of `levels` resolutions; attention's one qkv
    layer is diffusers' to_q, to_k and to_v, its rows in that order."""
    name = re.sub(r"^up\.(\d+)\.", lambda m: f"up.{levels - 1 - int(m[1])}.", name)
    for pattern, new in DIFFUSERS_NAMES:
        name = re.sub(pattern, new, name)
    return [name.replace(".qkv.", f".to_{c}.") for c in "qkv"] if ".qkv." in name else [name]


def read_json(path):
    try:
        with open(path) as f:
            settings = json.load(f)
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: not a readable JSON file ({getattr(e, 'strerror', None) or one_line(e)})") from None
    if not isinstance(settings, dict):
        raise UserError(f"{path}: not a JSON object of settings")
    return settings


def read_safetensors(path):
    """{name: tensor} of a .safetensors file, read without the safetensors package. The format (huggingface/safetensors,
    README): an 8-byte little-endian header size N; N bytes of JSON {name: {dtype, shape, data_offsets: [begin, end)},
    "__metadata__": {...}}; then the tensors' bytes, little-endian, at offsets counted from the header's end."""
    with open(path, "rb") as f:
        blob = bytearray(os.fstat(f.fileno()).st_size)  # writable: torch.frombuffer warns about read-only bytes
        f.readinto(blob)
    try:
        size = int.from_bytes(blob[:8], "little")
        if not 2 <= size <= len(blob) - 8:  # (a header that claims more bytes than the file has would read as less)
            raise ValueError(f"a header of {size} bytes in a file of {len(blob)}")
        header, body, tensors = json.loads(blob[8:8 + size]), memoryview(blob)[8 + size:], {}
        for name, entry in header.items():
            if name == "__metadata__":
                continue
            (begin, end), dtype, shape = entry["data_offsets"], SAFETENSORS_DTYPES.get(entry["dtype"]), entry["shape"]
            if dtype is None or not 0 <= begin <= end <= len(body) or end - begin != math.prod(shape) * dtype.itemsize:
                raise ValueError(f"{name}: {entry['dtype']} {shape} at bytes [{begin}, {end}) of {len(body)}")
            tensors[name] = torch.frombuffer(body[begin:end], dtype=dtype).reshape(shape)
    except (ValueError, KeyError, TypeError, AttributeError, RuntimeError) as e:
        raise UserError(f"{path}: not a readable safetensors file ({type(e).__name__}: {one_line(e)}): cut short? "
                        "download it again") from None
    return tensors


def write_safetensors(f, tensors):
    """{name: tensor} to the open file f as safetensors (see read_safetensors) in float32, as safetensors writes it:
    the header padded with spaces to a multiple of 8 bytes, which aligns every tensor, then the tensors in order."""
    tensors = {name: w.detach().to("cpu", torch.float32).contiguous() for name, w in sorted(tensors.items())}
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, w in tensors.items():
        header[name] = {"dtype": "F32", "shape": list(w.shape), "data_offsets": [offset, offset + 4 * w.numel()]}
        offset += 4 * w.numel()
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    f.write(len(text).to_bytes(8, "little") + text)
    for w in tensors.values():
        f.write(w.numpy().astype("<f4", copy=False).tobytes())


def read_diffusers_weights(folder):
    """The weights file of a UNet2DModel folder (safetensors first, as diffusers reads it) and its {name: tensor}."""
    path = os.path.join(folder, "diffusion_pytorch_model.safetensors")
    if os.path.isfile(path):
        return path, read_safetensors(path)
    path = path[:-len("safetensors")] + "bin"
    if not os.path.isfile(path):
        raise UserError(f"{folder}: no diffusion_pytorch_model.safetensors or .bin (a partial download, or sharded or "
                        "fp16-variant weights?); download the model's full-precision weights")
    try:
        weights = torch.load(path, map_location="cpu", weights_only=True)  # runs no code from the file
    except Exception as e:  # cut short, not a torch file, a pickle that wants code
        raise UserError(f"{path}: not a loadable weights file ({one_line(e).split('. ')[0]})") from None
    if not isinstance(weights, dict) or not all(torch.is_tensor(w) for w in weights.values()):
        raise UserError(f"{path}: not a state dict of tensors")
    return path, weights


def diffusers_model_config(path):
    """unet.UNet's keyword arguments for a UNet2DModel's config.json; UserError naming the first setting that makes it
    another network than Ho et al.'s, the one this toolkit builds."""
    settings = read_json(path)

    def refuse(key, value, why):
        raise UserError(f"{path}: {key} {json.dumps(value)}: {why}")
    widths, down = settings.get("block_out_channels"), settings.get("down_block_types")
    if settings.get("_class_name", "UNet2DModel") != "UNet2DModel":
        refuse("_class_name", settings["_class_name"], "only UNet2DModel, a pixel-space DDPM network, is read here")
    if not (isinstance(widths, list) and widths and all(type(w) is int and w > 0 and w % widths[0] == 0
                                                        for w in widths)):
        refuse("block_out_channels", widths, "give each level's width, each a multiple of the first")
    if not (isinstance(down, list) and len(down) == len(widths)
            and all(kind in ("DownBlock2D", "AttnDownBlock2D") for kind in down)):
        refuse("down_block_types", down, "Ho et al.'s network has a DownBlock2D or AttnDownBlock2D at each level")
    levels = [i for i, kind in enumerate(down) if kind == "AttnDownBlock2D"]
    mirror = [kind.replace("Down", "Up") for kind in reversed(down)]  # the up path attends where the down path does
    if settings.get("up_block_types") != mirror:
        refuse("up_block_types", settings.get("up_block_types"), f"Ho et al.'s network has {json.dumps(mirror)}; "
               "sample this model with diffusers")
    attention = {widths[i] for i in levels} | {widths[-1]}  # the attention layers' widths (the middle block's too)
    groups = settings.get("norm_num_groups", 32)  # unet's norm_groups: any that divides every width
    groups = groups if type(groups) is int and groups > 0 and all(w % groups == 0 for w in widths) else 32
    same = {"attn_norm_num_groups": [groups], "time_embedding_dim": [4 * widths[0]],  # what None means there, and
            "attention_head_dim": list(attention) if len(attention) == 1 else [],  # one head as wide as the layers
            "norm_num_groups": [groups]}
    for key, (default, value) in UNET2D_FIXED.items():
        given = settings.get(key, default)
        if given != value and given not in same.get(key, []):
            refuse(key, given, f"Ho et al.'s network has {json.dumps(value)}; sample this model with diffusers")
    for key, default in (("in_channels", 3), ("out_channels", 3), ("layers_per_block", 2)):
        given = settings.get(key, default)  # (a bool is an int to Python; a string or null builds nothing)
        if type(given) is not int or given < 1:
            refuse(key, given, "give a whole number, at least 1")
    dropout = settings.get("dropout", 0.0)
    if type(dropout) not in (int, float) or not 0 <= dropout < 1:
        refuse("dropout", dropout, "give a probability in [0, 1)")
    size, channels = settings.get("sample_size"), settings.get("in_channels", 3)
    if settings.get("out_channels", 3) != channels:  # (a learned variance doubles them)
        refuse("out_channels", settings.get("out_channels"), f"the network predicts noise shaped as its input "
               f"(in_channels {channels})")
    size = [size, size] if type(size) is int else size
    if not (isinstance(size, list) and len(size) == 2 and all(type(side) is int and side > 0 for side in size)):
        refuse("sample_size", settings.get("sample_size"), "give the image size it was trained at, [H, W] or one side")
    return dict(in_ch=channels, ch=widths[0], ch_mult=tuple(w // widths[0] for w in widths), attn_res=tuple(
        min(size) // 2 ** i for i in levels), num_res_blocks=settings.get("layers_per_block", 2),
        dropout=settings.get("dropout", 0.0), image_size=tuple(size), num_classes=0,
        **({} if groups == 32 else {"norm_groups": groups}))


def diffusers_diffusion(path):
    """ddpm.Diffusion's settings and the ddpm sampler's variance for a scheduler_config.json; UserError naming the first
    setting that makes it another diffusion. The settings of diffusers' own samplers (clip_sample, thresholding,
    timestep_spacing, steps_offset) are not read: sample.py samples with this toolkit's."""
    settings = read_json(path)
    T = settings.get("num_train_timesteps", 1000)
    if type(T) is not int or T < 2 or T > 100000:
        raise UserError(f"{path}: num_train_timesteps {json.dumps(T)}: give a whole number of steps, 2 to 100000")

    def named(names, key, default):  # this toolkit's name for the setting's value, or None
        value = settings.get(key, default)
        return names.get(value) if isinstance(value, str) else None

    def linear(key, value):  # ddpm.beta_schedule's: 1e-4 to 0.02 at T = 1000, scaled by 1000/T
        given = settings.get(key, value)
        return type(given) in (int, float) and math.isclose(given, value * 1000 / T, rel_tol=1e-6)
    schedule, target = named(SCHEDULES, "beta_schedule", "linear"), named(TARGETS, "prediction_type", "epsilon")
    variance = named(VARIANCES, "variance_type", "fixed_small")
    checks = [  # (setting, diffusers' default, this toolkit has it, what this toolkit has)
        ("_class_name", None, settings.get("_class_name") in ("DDPMScheduler", "DDIMScheduler"),
         "DDPMScheduler's and DDIMScheduler's diffusion"),
        ("trained_betas", None, settings.get("trained_betas") is None, "named schedules"),
        ("rescale_betas_zero_snr", False, not settings.get("rescale_betas_zero_snr"), "unrescaled betas"),
        ("beta_schedule", "linear", schedule, f"the beta_schedule {' and '.join(SCHEDULES)}"),
        ("beta_start", 1e-4, schedule != "linear" or linear("beta_start", 1e-4), f"linear betas from {0.1 / T:g} "
         f"at T = {T}"),
        ("beta_end", 0.02, schedule != "linear" or linear("beta_end", 0.02), f"linear betas to {20 / T:g} at T = {T}"),
        ("prediction_type", "epsilon", target, f"the prediction_type {', '.join(TARGETS)}"),
        ("variance_type", "fixed_small", variance, f"the variance_type {', '.join(VARIANCES)}")]
    for key, default, has, what in checks:
        if not has:
            raise UserError(f"{path}: {key} {json.dumps(settings.get(key, default))}: this toolkit has only {what}; "
                            "sample this model with diffusers")
    betas = ddpm.beta_schedule(schedule, T)
    if not ((betas > 0) & (betas < 1)).all():  # linear betas scaled by 1000/T pass 1 below T = 21
        raise UserError(f"{path}: num_train_timesteps {T}: the {schedule} schedule's betas leave (0, 1) at T = {T}")
    return dict(schedule=schedule, T=T, target=target, loss="mse"), variance


def load_diffusers(folder):
    """A diffusers DDPM folder, the pipeline layout (model_index.json, unet/, scheduler/) or a bare UNet2DModel's
    (config.json and weights), as a checkpoint dict that `build` takes, loaded running no code. Its one set of weights
    (the Hub's are the EMA's) is both "ema" and "model"; "variance" is the ddpm sampler's sigma_t^2 its scheduler gives
    (None without one). UserError, one line, for anything that would build another network or diffusion here."""
    index, config = os.path.join(folder, "model_index.json"), os.path.join(folder, "config.json")
    if os.path.isfile(index):
        parts = sorted(k for k in read_json(index) if not k.startswith("_"))
        if parts not in (["scheduler", "unet"], ["unet"]):  # a vqvae (latent diffusion), a text encoder, ...
            raise UserError(f"{index}: a pipeline of {', '.join(parts)}; only a DDPM (unet and scheduler) is read here")
        unet_dir, scheduler = os.path.join(folder, "unet"), os.path.join(folder, "scheduler", "scheduler_config.json")
    elif os.path.isfile(config) and read_json(config).get("_class_name") == "UNet2DModel":  # not a train.py run's
        unet_dir, scheduler = folder, None
    elif os.path.isfile(os.path.join(folder, "ckpt.pt")):  # a train.py run's folder
        raise UserError(f"{folder}: a folder, not a checkpoint file (a train.py run's); give "
                        f"{os.path.join(folder, 'ckpt.pt')}")
    else:
        raise UserError(f"{folder}: a folder, not a checkpoint file (train.py writes RUN_DIR/ckpt.pt) nor a diffusers "
                        "DDPM folder (model_index.json, or a UNet2DModel's config.json)")
    model_config = diffusers_model_config(os.path.join(unet_dir, "config.json"))
    if scheduler and os.path.isfile(scheduler):
        diffusion, variance = diffusers_diffusion(scheduler)
    else:  # a bare network: the diffusion it was trained with is not written down
        diffusion, variance = dict(schedule="linear", T=1000, target="eps", loss="mse"), None
        log(f"{folder}: no scheduler/scheduler_config.json; assuming the paper's diffusion (linear, T = 1000, eps)")
    path, weights = read_diffusers_weights(unet_dir)
    state = unet_state(path, weights, model_config)
    broken = [name for name, w in state.items() if w.is_floating_point() and not torch.isfinite(w).all()]
    if broken:  # as load_checkpoint refuses them: every sample (and --init's run) would come out NaN
        raise UserError(f"{path}: non-finite weights in {broken[0]} ({len(broken)} tensors); download it again")
    return dict(format=FORMAT, step=0, config={}, model_config=model_config, diffusion=diffusion, classes=[],
                model=state, ema=state, variance=variance)


def unet_state(path, weights, model_config):
    """unet.UNet's state dict for the network of model_config from UNet2DModel's weights (read from `path`); UserError
    naming the first weight that is missing, shaped otherwise, or left over."""
    weights = {re.sub(r"(\.attentions\.\d+\.)(query|key|value|proj_attn)\.", lambda m: m[1] + OLD_ATTENTION[m[2]] + ".",
                      name): w for name, w in weights.items()}
    try:
        with torch.device("meta"):  # the weights' names and shapes, none allocated
            shapes = unet.UNet(**model_config).state_dict()
    except (TypeError, ValueError) as e:
        raise UserError(f"{os.path.dirname(path)}/config.json: not a network unet.UNet builds ({e})") from None
    state = {}
    for name, like in shapes.items():
        parts = diffusers_names(name, len(model_config["ch_mult"]))
        found, shape = [weights.pop(part, None) for part in parts], [like.shape[0] // len(parts), *like.shape[1:]]
        for part, w in zip(parts, found):
            if w is None or list(w.shape) != shape:
                raise UserError(f"{path}: {part} is {'missing' if w is None else list(w.shape)} where the network of "
                                f"its config.json has {shape}: weights of another model?")
        state[name] = torch.cat(found) if len(found) > 1 else found[0]
    if weights:
        raise UserError(f"{path}: {min(weights)} has no place in the network of its config.json: weights of another "
                        "model?")
    return state


def diffusers_files(model, diffusion, image_size, variance=None):
    """The settings files of a DDPMPipeline folder for a unet.UNet without classes whose first level is ch wide, of
    images (H, W), and a ddpm.Diffusion: {path in the folder: settings}."""
    kinds = ["AttnDownBlock2D" if isinstance(down.attn[0], unet.AttnBlock) else "DownBlock2D" for down in model.down]
    T, size = diffusion.T, [int(side) for side in image_size]
    network = {"_class_name": "UNet2DModel", "_diffusers_version": DIFFUSERS_VERSION, "down_block_types": kinds,
               **{key: value for key, (_, value) in UNET2D_FIXED.items()},
               "block_out_channels": [down.block[-1].conv2.out_channels for down in model.down],
               "up_block_types": [kind.replace("Down", "Up") for kind in reversed(kinds)],
               "dropout": model.down[0].block[0].dropout.p, "in_channels": model.conv_in.in_channels,
               "out_channels": model.conv_out.out_channels, "layers_per_block": len(model.down[0].block),
               "num_train_timesteps": None, "sample_size": size[0] if size[0] == size[1] else size,
               "norm_num_groups": model.norm_out.num_groups}
    process = {"_class_name": "DDPMScheduler", "_diffusers_version": DIFFUSERS_VERSION, "num_train_timesteps": T,
               "beta_schedule": {v: k for k, v in SCHEDULES.items()}[diffusion.schedule], "trained_betas": None,
               "beta_start": 0.1 / T, "beta_end": 20 / T,  # the linear schedule's (squaredcos_cap_v2 has none)
               "prediction_type": {v: k for k, v in TARGETS.items()}[diffusion.target], "rescale_betas_zero_snr": False,
               # sample.py's ddpm variance (beta, unless a diffusers scheduler said beta_tilde); Diffusion.predict
               # clips x_0 to [-1, 1]; ddpm.spaced_timesteps are trailing
               "variance_type": "fixed_small" if variance == "beta_tilde" else "fixed_large",
               "clip_sample": True, "clip_sample_range": 1.0, "thresholding": False, "sample_max_value": 1.0,
               "dynamic_thresholding_ratio": 0.995, "timestep_spacing": "trailing", "steps_offset": 0}
    index = {"_class_name": "DDPMPipeline", "_diffusers_version": DIFFUSERS_VERSION,
             "scheduler": ["diffusers", "DDPMScheduler"], "unet": ["diffusers", "UNet2DModel"]}
    return {"model_index.json": index, "unet/config.json": network, "scheduler/scheduler_config.json": process}


def export_diffusers(ckpt, folder, ema=True):
    """Write a checkpoint's network (EMA or raw weights) and diffusion as a diffusers DDPMPipeline folder, made under a
    temporary name beside `folder` and renamed: no reader sees half of one. UserError where UNet2DModel has no form of
    the network: a class embedding, a first level wider than conv_in (ch_mult not starting at 1), or AdaGN (its
    "scale_shift" drops the middle attention's GroupNorm)."""
    empty = os.path.isdir(folder) and not os.path.islink(folder) and not os.listdir(folder)  # renamed over: POSIX
    if (os.path.lexists(folder) and not empty) or not os.path.isdir(os.path.dirname(os.path.abspath(folder))):
        why = "already exists" if os.path.lexists(folder) else "its folder does not exist"
        raise UserError(f"--export-diffusers {folder}: {why}; give the path of a new or empty folder")
    model, diffusion = build(ckpt, ema)
    first = model.down[0].block[0].conv2.out_channels
    why = ["class labels (this checkpoint is conditional)" if model.class_emb is not None else "",
           f"ch_mult starting at {first // model.ch}, only at 1" if first != model.ch else "",
           "form of --scale-shift (AdaGN; the small and tiny presets' default): its scale_shift blocks have no GroupNorm "
           "before the middle attention; train with --no-scale-shift to export"
           if model.mid.block_1.scale_shift else ""]
    if any(why):
        raise UserError("--export-diffusers: UNet2DModel has no " + next(filter(None, why)))
    weights = {}
    for name, w in model.state_dict().items():
        parts = diffusers_names(name, len(model.down))
        weights.update(zip(parts, w.chunk(len(parts))))
    tmp = f"{os.path.abspath(folder).rstrip(os.sep)}.{os.getpid()}{os.urandom(4).hex()}.tmp"
    try:
        for sub in ("", "unet", "scheduler"):
            os.mkdir(os.path.join(tmp, sub))
        for name, settings in diffusers_files(model, diffusion, ckpt["model_config"]["image_size"],
                                              ckpt.get("variance")).items():  # as diffusers writes them
            text = json.dumps(settings, indent=2, sort_keys=True).encode() + b"\n"
            write_atomically(os.path.join(tmp, name), lambda f: f.write(text))
        write_atomically(os.path.join(tmp, "unet", "diffusion_pytorch_model.safetensors"),
                         lambda f: write_safetensors(f, weights))
        os.rename(tmp, folder)  # the whole folder at once
    finally:  # an error removes the partial folder
        if os.path.lexists(tmp):
            shutil.rmtree(tmp)
