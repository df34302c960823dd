"""FID: the Fréchet Inception Distance between two sets of images (Heusel et al. 2017, arXiv:1706.08500).

    python fid.py samples/ data/train/               # FID between two folders of images (searched recursively)
    python fid.py samples/ train_stats.npz           # ... or against saved statistics (keys mu, sigma)
    python fid.py data/train/ --save-stats train_stats.npz
    python fid.py samples/ data/train/ --size 32 --n 10000  # the data read as train.py --size 32 does, 10,000 of it
    python fid.py samples/ --is                      # the Inception Score of a folder (beside an FID: two PATHs)

Numbers and statistics files are pytorch-fid's: its port of TF's inception-2015-12-05 graph, PIL decoding to
RGB, bilinear resize to 299x299, 2048-d pool3 features, float64 statistics, scipy's sqrtm. Rotated (EXIF), 16-bit
and transparent images are decoded as train.py trains on them; unreadable ones are skipped and named, as there.
--n N takes a uniform random N of a folder, the same on every run. Bad input: one line on stderr, exit status 2.
The Inception Score (Salimans et al. 2016, arXiv:1606.03498) is torch-fidelity's formula on the 1008-way logits of
the same pass (inception_score). It needs the graph's real classifier (fc) weights: pytorch-fid's file has them; a
file made from a port that lacked them (NVIDIA's TorchScript) loads all the same, and its IS means nothing.
It keeps its own image search, decoding, skipped-file report, float-to-uint8, atomic writes and torch-file checks
(data.py's), to work copied alone.
"""
import argparse
import contextlib
import hashlib
import os
import re
import sys
import tempfile
import time
import urllib.request
import warnings
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import scipy.linalg
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image, ImageOps

WEIGHTS_NAME = 'pt_inception-2015-12-05-6726825d.pth'
WEIGHTS_URL = 'https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/' + WEIGHTS_NAME
WEIGHTS_SHA256 = '6726825d0af5f729cebd5821db510b11b1cfad8faad88a03f1befd49fb9129b2'  # of WEIGHTS_URL's 95,628,359 bytes
IMAGE_EXTENSIONS = {'.png', '.jpg', '.jpeg', '.webp', '.bmp', '.tif', '.tiff', '.gif'}
STATS_VERSION = 3  # part of the statistics cache key: change it when the preprocessing changes
DIMS = 2048  # pool3 features
SUBSET_SEED = 0  # which n images of a folder --n takes (readable_files)
IS_SPLITS = 10  # the Inception Score's splits (Salimans et al.'s and torch-fidelity's)
COUNTS = {'n': 2, 'batch_size': 1, 'workers': 1}  # the smallest value of each count; a covariance needs 2 images


class FIDError(ValueError):
    """A problem the user can fix (a path, a file, a flag): the CLI prints it as one line and exits with 2."""


def check_counts(**counts):
    """FIDError unless each count given (not None) is an integer >= its minimum in COUNTS."""
    for name, value in counts.items():
        if value is not None and not (isinstance(value, (int, np.integer)) and value >= COUNTS[name]):
            raise FIDError(f'{name} = {value!r}: must be a whole number >= {COUNTS[name]}')


# --- The network. Attribute names are pytorch-fid's (torchvision's Inception3), so its state dict loads strictly.

class BasicConv2d(nn.Module):
    """Convolution without bias, batch norm (TF's eps 0.001), ReLU. 'same' is TF's SAME (odd kernels, stride 1)."""

    def __init__(self, in_ch, out_ch, kernel_size, stride=1, padding='same'):
        super().__init__()
        self.conv = nn.Conv2d(in_ch, out_ch, kernel_size, stride, padding, bias=False)
        self.bn = nn.BatchNorm2d(out_ch, eps=0.001)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)), inplace=True)

    @torch.no_grad()
    def fold_batchnorm(self):
        """Folds the frozen batch norm into the convolution, in float64 (pool3 moves by about 1e-5; the parity tests
        allow 1e-4): 1.1x the images/s on 2 CPU cores, 16% less peak memory (docs/benchmarks.md)."""
        bn, conv = self.bn, self.conv
        scale = bn.weight.double() / torch.sqrt(bn.running_var.double() + bn.eps)
        conv.weight.copy_(conv.weight.double() * scale[:, None, None, None])
        conv.bias = nn.Parameter((bn.bias.double() - bn.running_mean.double() * scale).float())
        self.bn = nn.Identity()


class NamedConvs(nn.Module):
    """BasicConv2d(*args) as attribute NAME for each NAME=args, args (in, out, kernel[, stride, padding])."""

    def __init__(self, **convs):
        super().__init__()
        for name, args in convs.items():
            self.add_module(name, BasicConv2d(*args))


def avg_pool_3x3(x):
    # TF averages over the pixels inside the image only, hence count_include_pad=False (torchvision's differs).
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)


class InceptionA(NamedConvs):
    """35x35 block (Mixed_5b, 5c, 5d): 1x1, 5x5, double 3x3 and pooled branches, concatenated."""

    def __init__(self, in_ch, pool_ch):
        super().__init__(branch1x1=(in_ch, 64, 1), branch5x5_1=(in_ch, 48, 1), branch5x5_2=(48, 64, 5),
                         branch3x3dbl_1=(in_ch, 64, 1), branch3x3dbl_2=(64, 96, 3), branch3x3dbl_3=(96, 96, 3),
                         branch_pool=(in_ch, pool_ch, 1))

    def forward(self, x):
        return torch.cat([self.branch1x1(x), self.branch5x5_2(self.branch5x5_1(x)),
                          self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                          self.branch_pool(avg_pool_3x3(x))], 1)


class InceptionB(NamedConvs):
    """Reduction 35x35 -> 17x17 (Mixed_6a)."""

    def __init__(self, in_ch):
        super().__init__(branch3x3=(in_ch, 384, 3, 2, 0), branch3x3dbl_1=(in_ch, 64, 1),
                         branch3x3dbl_2=(64, 96, 3), branch3x3dbl_3=(96, 96, 3, 2, 0))

    def forward(self, x):
        return torch.cat([self.branch3x3(x), self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                          F.max_pool2d(x, 3, stride=2)], 1)


class InceptionC(NamedConvs):
    """17x17 block (Mixed_6b..6e): 7x7 convolutions factored into 1x7 and 7x1."""

    def __init__(self, in_ch, mid):
        super().__init__(branch1x1=(in_ch, 192, 1), branch7x7_1=(in_ch, mid, 1), branch7x7_2=(mid, mid, (1, 7)),
                         branch7x7_3=(mid, 192, (7, 1)), branch7x7dbl_1=(in_ch, mid, 1),
                         branch7x7dbl_2=(mid, mid, (7, 1)), branch7x7dbl_3=(mid, mid, (1, 7)),
                         branch7x7dbl_4=(mid, mid, (7, 1)), branch7x7dbl_5=(mid, 192, (1, 7)),
                         branch_pool=(in_ch, 192, 1))

    def forward(self, x):
        dbl = self.branch7x7dbl_3(self.branch7x7dbl_2(self.branch7x7dbl_1(x)))
        return torch.cat([self.branch1x1(x), self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x))),
                          self.branch7x7dbl_5(self.branch7x7dbl_4(dbl)), self.branch_pool(avg_pool_3x3(x))], 1)


class InceptionD(NamedConvs):
    """Reduction 17x17 -> 8x8 (Mixed_7a)."""

    def __init__(self, in_ch):
        super().__init__(branch3x3_1=(in_ch, 192, 1), branch3x3_2=(192, 320, 3, 2, 0), branch7x7x3_1=(in_ch, 192, 1),
                         branch7x7x3_2=(192, 192, (1, 7)), branch7x7x3_3=(192, 192, (7, 1)),
                         branch7x7x3_4=(192, 192, 3, 2, 0))

    def forward(self, x):
        b7 = self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x)))
        return torch.cat([self.branch3x3_2(self.branch3x3_1(x)), self.branch7x7x3_4(b7),
                          F.max_pool2d(x, 3, stride=2)], 1)


class InceptionE(NamedConvs):
    """8x8 block (Mixed_7b, 7c) with 1x3 / 3x1 splits; the TF graph's Mixed_7c pools by maximum (`max_pool`)."""

    def __init__(self, in_ch, max_pool):
        super().__init__(branch1x1=(in_ch, 320, 1), branch3x3_1=(in_ch, 384, 1), branch3x3_2a=(384, 384, (1, 3)),
                         branch3x3_2b=(384, 384, (3, 1)), branch3x3dbl_1=(in_ch, 448, 1),
                         branch3x3dbl_2=(448, 384, 3), branch3x3dbl_3a=(384, 384, (1, 3)),
                         branch3x3dbl_3b=(384, 384, (3, 1)), branch_pool=(in_ch, 192, 1))
        self.max_pool = max_pool

    def forward(self, x):
        b3, dbl = self.branch3x3_1(x), self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        pool = F.max_pool2d(x, 3, stride=1, padding=1) if self.max_pool else avg_pool_3x3(x)
        return torch.cat([self.branch1x1(x), self.branch3x3_2a(b3), self.branch3x3_2b(b3),
                          self.branch3x3dbl_3a(dbl), self.branch3x3dbl_3b(dbl), self.branch_pool(pool)], 1)


class FIDInception(NamedConvs):
    """float [N, 3, H, W] in [0, 1] -> pool3 features [N, 2048], resizing to 299x299 (bilinear) if needed; `logits`
    takes those to the graph's 1008 class logits."""

    def __init__(self):
        super().__init__(Conv2d_1a_3x3=(3, 32, 3, 2, 0), Conv2d_2a_3x3=(32, 32, 3, 1, 0), Conv2d_2b_3x3=(32, 64, 3),
                         Conv2d_3b_1x1=(64, 80, 1), Conv2d_4a_3x3=(80, 192, 3, 1, 0))
        self.Mixed_5b, self.Mixed_5c, self.Mixed_5d = InceptionA(192, 32), InceptionA(256, 64), InceptionA(288, 64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b, self.Mixed_6c = InceptionC(768, mid=128), InceptionC(768, mid=160)
        self.Mixed_6d, self.Mixed_6e = InceptionC(768, mid=160), InceptionC(768, mid=192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b, self.Mixed_7c = InceptionE(1280, max_pool=False), InceptionE(2048, max_pool=True)
        self.fc = nn.Linear(2048, 1008)  # the graph's 1008-way softmax/logits layer (the IS's classes)

    def logits(self, pool3):
        """float32 [N, 1008] logits of pool3 features [N, 2048] (forward's), on the CPU: the fc layer without its
        bias, as the original IS code (pool3 times softmax/logits/MatMul's weight) and torch-fidelity's IS take them.
        A linear map of pool3: the IS needs no second pass through the network."""
        return torch.as_tensor(pool3, dtype=torch.float32) @ self.fc.weight.detach().cpu().T

    def forward(self, x):
        if x.shape[2:] != (299, 299):
            x = F.interpolate(x, size=(299, 299), mode='bilinear', align_corners=False)
        x = 2 * x - 1                                                        # the TF graph's input range
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))   # 147x147
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(F.max_pool2d(x, 3, stride=2)))
        x = F.max_pool2d(x, 3, stride=2)                                     # 35x35
        x = self.Mixed_6a(self.Mixed_5d(self.Mixed_5c(self.Mixed_5b(x))))  # 17x17
        x = self.Mixed_7a(self.Mixed_6e(self.Mixed_6d(self.Mixed_6c(self.Mixed_6b(x)))))  # 8x8
        return F.adaptive_avg_pool2d(self.Mixed_7c(self.Mixed_7b(x)), 1).flatten(1)  # pool3


# --- Weights

def cache_dir():
    cache = os.environ.get('XDG_CACHE_HOME', '')  # the XDG spec: an empty or relative one is ignored
    return Path(cache if os.path.isabs(cache) else Path.home() / '.cache') / 'ddpm-toolkit'


def find_weights(weights=None, download=True):
    """`weights`, else $FID_WEIGHTS, else the cache file (local files are not hashed), else pytorch-fid's file
    downloaded into a temporary file, renamed there once its sha256 is right (download=False: FIDError instead)."""
    for path, source in ((weights, '--weights'), (os.environ.get('FID_WEIGHTS') or None, 'FID_WEIGHTS')):
        if path is not None:  # --weights '' is a mistake; an empty variable is unset
            if not Path(path).is_file():
                raise FIDError(f'{source} {path}: no such file; give the path of {WEIGHTS_NAME}')
            return Path(path)
    dest = cache_dir() / WEIGHTS_NAME
    if dest.is_file():
        return dest
    if not download:
        raise FIDError(f'no FID weights: set FID_WEIGHTS=PATH or put {WEIGHTS_NAME} at {dest}')
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=WEIGHTS_NAME, suffix='.part')
    try:
        digest = hashlib.sha256()
        with os.fdopen(fd, 'wb') as f, urllib.request.urlopen(WEIGHTS_URL, timeout=60) as response:
            print(f'fid: downloading {WEIGHTS_URL} to {dest}', file=sys.stderr)  # once it answers
            while chunk := response.read(1 << 20):
                f.write(chunk)
                digest.update(chunk)
        if digest.hexdigest() != WEIGHTS_SHA256:
            raise FIDError(f'{WEIGHTS_URL}: sha256 {digest.hexdigest()}, not {WEIGHTS_SHA256}; download deleted')
        os.replace(tmp, dest)
    except OSError as e:  # no network, HTTP errors (URLError is an OSError), a full disk
        raise FIDError(f'no FID weights and the download failed ({e}): put {WEIGHTS_NAME} at {dest}, '
                       'or set FID_WEIGHTS=PATH, or pass --weights PATH') from None
    finally:
        Path(tmp).unlink(missing_ok=True)
    return dest


def load_inception(weights=None, device='cpu'):
    """FIDInception on `device` in eval mode, loaded strictly (the IS's fc logits too), its batch norms folded."""
    path = find_weights(weights)
    model = FIDInception()
    try:
        with open(path, 'rb') as f:  # torch.save writes a zip: header first, directory last (a cut one has none)
            if f.read(4) in (b'', b'PK\x03\x04') and not zipfile.is_zipfile(f):  # torch's error varies with the cut
                raise EOFError
        state = torch.load(path, map_location='cpu', weights_only=True)
        model.load_state_dict(state, strict=True)
    except Exception as e:  # a damaged file fails in many ways (pickle, zip, EOF, missing or misshapen keys)
        lines = str(e).strip().splitlines() or [type(e).__name__]
        reason = ('empty or cut short' if isinstance(e, EOFError) or 'central directory' in lines[0] else
                  'damaged, or not a file torch.save wrote' if isinstance(e, KeyError) else  # bytes no pickle has
                  'it holds Python objects, not only tensors; none was run' if 'Unsupported' in str(e) else
                  lines[-1 if 'state_dict' in lines[0] else 0].strip().split('. ')[0][:150])  # the key, not the header
        raise FIDError(f"{path}: not FID Inception weights in pytorch-fid's layout ({reason}); "
                       f'use {WEIGHTS_NAME}') from None
    for module in model.modules():
        if isinstance(module, BasicConv2d):
            module.fold_batchnorm()
    stat = path.stat()  # keys the statistics cache: another file's statistics are other numbers
    model.weights_id = f'{path.resolve()} {stat.st_size} {stat.st_mtime_ns}'
    # channels_last lets oneDNN run the convolutions without reordering each input: 1.4x the images/s on 2 CPU cores.
    return model.eval().requires_grad_(False).to(device, memory_format=torch.channels_last)


# --- Images to activations

def to_uint8(images):
    """uint8 [N, H, W, 3] tensor from uint8 [N, H, W(, C)] or float [N, C, H, W] in [-1, 1], C 1 or 3. Floats
    are quantised as a PNG writer does, round(clamp((x + 1) / 2, 0, 1) * 255): samples give their PNGs' FID."""
    images = torch.as_tensor(images)
    if images.dtype == torch.uint8 and images.ndim == 3:
        images = images[..., None]  # grey
    elif images.is_floating_point() and images.ndim == 4 and images.shape[1] in (1, 3):
        if not torch.isfinite(images).all():  # NaN would become black pixels, and a finite FID
            raise FIDError('images hold NaN or infinite values; they have no FID')
        images = ((images.float() + 1) / 2).clamp(0, 1).mul(255).round().to(torch.uint8).permute(0, 2, 3, 1)
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[3] not in (1, 3):
        raise FIDError(f'images must be uint8 [N, H, W, C] or float [N, C, H, W] in [-1, 1], C 1 or 3, not '
                       f'{images.dtype} {list(images.shape)}')
    return images.expand(-1, -1, -1, 3)  # grey -> RGB


def model_input(images, device):
    """uint8 [N, H, W, 3] (or a list of [H, W, 3] of mixed sizes) -> float [N, 3, 299, 299] in [0, 1], as
    pytorch-fid: x / 255, bilinear resize, align_corners=False. The permuted view is already channels_last."""
    if isinstance(images, list):  # mixed sizes: one by one (none: every file of the batch was unreadable)
        return torch.cat([model_input(image[None], device) for image in images] or [torch.empty(0, 3, 299, 299)])
    x = images.to(device).permute(0, 3, 1, 2).float() / 255
    return F.interpolate(x, size=(299, 299), mode='bilinear', align_corners=False)


def read_image(path, verify=False, size=None):
    """uint8 [H, W, 3] as train.py reads an image: EXIF orientation applied, 16-bit grey scaled to 8 bits, transparency
    composited on white, then RGB; otherwise pytorch-fid's convert('RGB'). size (H, W): then as train.py's --size,
    the shorter side resized (Lanczos; a JPEG decoded at the smallest scale that covers it) and centre-cropped.
    verify: only PIL's check of the file (a PNG's checksums, other formats' headers), without decoding (a 512x512
    PNG: 0.23 ms against 3.6 ms). A copy of train.py's decoder, kept equal by tests/test_data.py."""
    try:
        with warnings.catch_warnings():  # Pillow warns between its limit and twice it: refused below, in one line
            warnings.simplefilter('ignore', Image.DecompressionBombWarning)
            image = Image.open(path)
        with image:
            if Image.MAX_IMAGE_PIXELS and image.width * image.height > Image.MAX_IMAGE_PIXELS:  # (Pillow: under 2x)
                raise ValueError(f'{image.width}x{image.height} pixels, over Pillow\'s decompression-bomb limit')
            if verify:
                return image.verify()
            kind = image.format
            if image.mode == 'F' or (image.mode == 'I' and kind == 'TIFF'):  # train.py skips these too
                raise FIDError(f'{path}: 32-bit pixels have no standard range; save it with 8 or 16 bits')
            if size:
                image.draft('RGB', (size[1], size[0]))
            ImageOps.exif_transpose(image, in_place=True)  # in place: no copy of an image that is not turned
            if image.mode.startswith('I;16') or (image.mode == 'I' and kind != 'TIFF'):  # I: a 16-bit PGM
                grey, transparent = np.asarray(image, np.float64), image.info.get('transparency')
                image = Image.fromarray((grey / 257).clip(0, 255).astype(np.uint8))
                if transparent is not None:
                    image.putalpha(Image.fromarray(((grey != transparent) * 255).astype(np.uint8)))
            if image.mode in ('RGBA', 'LA', 'PA') or 'transparency' in image.info:
                image = Image.alpha_composite(Image.new('RGBA', image.size, 'white'), image.convert('RGBA'))
            image = image.convert('RGB')
            if size:
                image = ImageOps.fit(image, (size[1], size[0]), Image.Resampling.LANCZOS)
            return np.array(image)  # a writable copy for torch
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:  # PIL uses all of these
        raise FIDError(f'{path}: cannot read this image ({e}); remove or replace it') from None


def report_skipped(skipped, path, shown=20):
    """The unreadable files met, named (the first `shown`) on stderr: train.py's rule, skip, count and name them."""
    if skipped:
        more = [f'  ... and {len(skipped) - shown} more'] if len(skipped) > shown else []
        print('\n'.join([f'fid: skipped {len(skipped)} unreadable image file(s) in {path}:',
                         *[f'  {message}' for message in skipped[:shown]], *more]), file=sys.stderr)


def show_progress(label, done, total, seconds):
    """A stderr line redrawn in place on a terminal (\\x1b[K clears the rest of it); elsewhere only the last."""
    line = f'fid: {label}: {done}/{total} images, {done / seconds:.1f} images/s'
    if sys.stderr.isatty():
        print(f'\r{line}\x1b[K', end='\n' if done == total else '', file=sys.stderr, flush=True)
    elif done == total:
        print(line, file=sys.stderr, flush=True)


def run_model(model, make_batch, n, batch_size, device, workers, label, progress):
    """float32 [n, 2048] pool3 features of images [0, n), uint8 batches from `make_batch(start, stop)`. `workers`
    threads decode and resize them (on `device`, default the model's) while the network runs: 1.2x the images/s for
    512x512 PNGs on 2 CPU cores (none for 28x28), and the resize there, not here, 1.1x-1.3x (docs/benchmarks.md)."""
    check_counts(batch_size=batch_size, workers=workers)
    model_device = next(model.parameters()).device
    device = device or model_device
    batches = [(start, min(start + batch_size, n)) for start in range(0, n, batch_size)]
    outputs, start_time = [], time.perf_counter()

    def prepare(start, stop):  # on a background thread
        return model_input(make_batch(start, stop), device)

    # cuDNN may run float32 convolutions in TF32, about 1e-3 off: FID needs the float32 numbers. The switch is
    # cudnn.conv.fp32_precision from torch 2.9 (which refuses the old one after it), cudnn.allow_tf32 before.
    cudnn = torch.backends.cudnn
    switch, name, ieee = (cudnn.conv, 'fp32_precision', 'ieee') if hasattr(cudnn, 'conv') else (cudnn, 'allow_tf32', False)
    saved = getattr(switch, name)
    setattr(switch, name, ieee)
    try:
        with ThreadPoolExecutor(workers) as pool, torch.inference_mode():
            pending = [pool.submit(prepare, *batch) for batch in batches[:workers + 1]]
            for i, (_, stop) in enumerate(batches):
                x = pending.pop(0).result()
                pending += [pool.submit(prepare, *batch) for batch in batches[i + workers + 1:i + workers + 2]]
                if len(x):
                    outputs.append(model(x.to(model_device)).cpu())
                if progress:
                    show_progress(label, stop, n, time.perf_counter() - start_time)
    finally:
        setattr(switch, name, saved)
    return torch.cat(outputs).numpy() if outputs else np.empty((0, DIMS), np.float32)


def activations(images, model, batch_size=50, device=None, progress=False):
    """pool3 features, float32 [N, 2048], of images as to_uint8 takes them; the resize runs on `device`."""
    if len(images) < 1:
        raise FIDError('no images')
    return run_model(model, lambda start, stop: to_uint8(images[start:stop]), len(images), batch_size, device, 1,
                     'images', progress)


def image_files(path):
    """The image files under folder `path` (recursive, by extension, sorted), at least 2."""
    if not Path(path).is_dir():
        raise FIDError(f'{path}: {"not a folder" if Path(path).exists() else "no such folder"}')
    # As train.py's search: linked folders outside `path` followed once, links to folders inside it skipped (read
    # under their own names), regular files only (a FIFO named x.png would block), hidden names skipped (._x.png).
    images, seen, top = [], set(), os.path.join(os.path.realpath(path), '')
    for folder, subfolders, names in os.walk(path, followlinks=True):
        real = os.path.realpath(folder)
        if real in seen:  # a link loop, or a folder linked twice
            subfolders.clear()
            continue
        seen.add(real)
        inside = [d for d in subfolders if os.path.islink(os.path.join(folder, d))
                  and os.path.join(os.path.realpath(os.path.join(folder, d)), '').startswith(top)]
        subfolders[:] = sorted({d for d in subfolders if not d.startswith('.')} - set(inside))
        images += [p for p in map(Path(folder).joinpath, names)
                   if not p.name.startswith('.') and p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()]
    images.sort()
    if len(images) < 2:
        raise FIDError(f'{path}: {len(images)} image file(s); FID and IS need at least 2 '
                       f'({", ".join(sorted(IMAGE_EXTENSIONS))}, hidden names skipped)')
    return images


def readable_files(path, n=None, files=None):
    """(files, skipped): n image files of folder `path` (None: all) that pass PIL's check, in sorted order, and the
    messages of the unreadable ones met. n of them are a uniform random draw, the same on every run (a permutation
    seeded by SUBSET_SEED), never the first n names: in class folders (MNIST by digit, ImageNet's) that is one class.
    `files`: image_files(path), where the caller has it already."""
    check_counts(n=n)
    files = image_files(path) if files is None else files
    if n and len(files) < n:
        raise FIDError(f'{path}: {len(files)} image files, fewer than n = {n}; add images or lower --n')
    chosen, skipped = [], []
    for i in np.random.default_rng(SUBSET_SEED).permutation(len(files)) if n else range(len(files)):
        if len(chosen) == n:
            break
        try:
            read_image(files[i], verify=True)
            chosen.append(files[i])
        except FIDError as e:
            skipped.append(str(e))
    if len(chosen) < (n or COUNTS['n']):
        raise FIDError(f'{path}: {len(chosen)} readable image files, fewer than {n or COUNTS["n"]} ({skipped[0]})')
    return sorted(chosen), skipped


def subset_note(path, n=None):
    """Which images of a folder n means, for logs: all of them or a random n; a .npz's are its own."""
    if not Path(path).is_dir():
        return 'its saved statistics'
    total = len(image_files(path))
    return f'all {total} images' if not n or n >= total else \
        f'a uniform random {n} of its {total} images (seed {SUBSET_SEED})'


def bias_warning(n):
    """A warning for an FID of n < DIMS images, or None: it is biased upward, more the fewer (Chong & Forsyth 2020)."""
    if n < DIMS:
        return (f'an FID of {n} images is biased upward (under {DIMS}, the features\' dimension, their covariance is '
                'rank-deficient): compare only FIDs of the same n, and use 2048 or more for a number to report')


def folder_activations(path, model, n=None, batch_size=50, device=None, workers=1, progress=False, size=None,
                       chosen=None):
    """pool3 features, float32 [N, 2048], of readable_files(path, n) (or `chosen`, its result), read at `size` (H, W)
    if given. Files that fail to decode are skipped too, and all the skipped named on stderr."""
    files, skipped = chosen or readable_files(path, n)
    skipped = list(skipped)

    def make_batch(start, stop):  # one size: one resize call (1.03x at 28x28, 7-10% less memory); mixed: a list
        decoded = []
        for f in files[start:stop]:
            try:
                decoded.append(torch.from_numpy(read_image(f, size=size)))
            except FIDError as e:  # PIL's check passed, the decoding did not: skipped as train.py skips it
                skipped.append(str(e))
        return torch.stack(decoded) if decoded and all(d.shape == decoded[0].shape for d in decoded) else decoded
    acts = run_model(model, make_batch, len(files), batch_size, device, workers, str(path), progress)
    report_skipped(skipped, path)
    if len(acts) < COUNTS['n']:
        raise FIDError(f'{path}: {len(acts)} readable image(s); FID and IS need at least {COUNTS["n"]}')
    return acts


# --- Statistics and the distance

def statistics(acts):
    """Mean [D] and covariance [D, D] of activations [N, D], in float64 (np.cov, rowvar=False: N - 1)."""
    acts = np.asarray(acts, dtype=np.float64)
    if acts.ndim != 2 or len(acts) < 2:
        raise FIDError(f'statistics need activations [N >= 2, D], not {list(acts.shape)}')
    return acts.mean(axis=0), np.cov(acts, rowvar=False)


def inception_score(logits, splits=None):
    """(mean, std, splits): IS = exp(E_x KL(p(y|x) || p(y))) (Salimans et al. 2016, sec. 4) of each of `splits` parts
    of the images, p(y|x) the softmax of logits [N, C] and p(y) its mean over the part. torch-fidelity's formula and
    parts (isc_splits, samples_shuffle=False): images [i N // splits, (i + 1) N // splits) in order, float64, np.std's
    ddof 0. splits: IS_SPLITS, or 1 under IS_SPLITS images (parts of one image would each score exactly 1). An IS is 1
    where every prediction is the same, and k where a part's k images are each confidently a class of their own."""
    probs = torch.as_tensor(logits, dtype=torch.float64).softmax(1)
    splits = splits or (IS_SPLITS if len(probs) >= IS_SPLITS else 1)
    if len(probs) < splits:
        raise FIDError(f'an Inception Score of {splits} splits needs at least {splits} images, not {len(probs)}')
    scores = []
    for i in range(splits):
        p = probs[i * len(probs) // splits:(i + 1) * len(probs) // splits]
        kl = (torch.xlogy(p, p) - torch.xlogy(p, p.mean(0))).sum(1)  # xlogy: 0 log 0 = 0
        scores.append(kl.mean().exp().item())
    return float(np.mean(scores)), float(np.std(scores)), splits


# (what is wrong, test of float64 mu, sigma and whether they meet the network): cheap next to the square root.
STATS_CHECKS = (
    ('mu and sigma are not [D] and [D, D]', lambda mu, s, net: mu.ndim == 1 and len(mu) and s.shape == mu.shape * 2),
    ('NaN or infinite values', lambda mu, s, net: np.isfinite(mu).all() and np.isfinite(s).all()),
    ('sigma is not symmetric', lambda mu, s, net: np.abs(s - s.T).max() <= 1e-6 * np.abs(s).max()),
    ("a negative variance on sigma's diagonal", lambda mu, s, net: np.diagonal(s).min() >= 0),
    (f"not {DIMS}-d like the network's pool3 features", lambda mu, s, net: not net or len(mu) == DIMS),
)


def check_stats(mu, sigma, name, network=False):
    """(mu, sigma) in float64 after STATS_CHECKS; FIDError naming `name`."""
    mu, sigma = np.asarray(mu), np.asarray(sigma)
    if mu.dtype.kind not in 'fiu' or sigma.dtype.kind not in 'fiu':  # complex or bool would cast silently
        raise FIDError(f'{name}: mu and sigma must hold real numbers, not {mu.dtype} and {sigma.dtype}')
    mu, sigma = mu.astype(np.float64), sigma.astype(np.float64)
    for problem, ok in STATS_CHECKS:
        if not ok(mu, sigma, network):
            raise FIDError(f'{name}: {problem} (mu {list(mu.shape)}, sigma {list(sigma.shape)})')
    return mu, sigma


def frechet_distance(mu1, sigma1, mu2, sigma2, eps=1e-6):
    """d^2 = |mu1 - mu2|^2 + Tr(sigma1 + sigma2 - 2 (sigma1 sigma2)^(1/2)), the Fréchet distance between
    N(mu1, sigma1) and N(mu2, sigma2) (Dowson & Landau 1982), computed as pytorch-fid does."""
    mu1, sigma1 = check_stats(np.atleast_1d(mu1), np.atleast_2d(sigma1), 'the first statistics')
    mu2, sigma2 = check_stats(np.atleast_1d(mu2), np.atleast_2d(sigma2), 'the second statistics')
    if mu1.shape != mu2.shape:
        raise FIDError(f'statistics do not match: {len(mu1)}-d and {len(mu2)}-d')
    # Few images make the product singular and scipy warn (overflow too): the checks below judge the root.
    with warnings.catch_warnings(), np.errstate(over='ignore', invalid='ignore'):
        warnings.simplefilter('ignore', scipy.linalg.LinAlgWarning)
        covmean = scipy.linalg.sqrtm(sigma1 @ sigma2)
        if not np.isfinite(covmean).all():
            offset = np.eye(len(mu1)) * eps
            covmean = scipy.linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
        imaginary = np.abs(np.diagonal(covmean).imag).max() if np.iscomplexobj(covmean) else 0
        if imaginary > 1e-3:  # rounding leaves a tiny imaginary part; a large one, no trustworthy root
            raise FIDError(f'the covariance product has no real square root (imaginary part {imaginary:.3g}): '
                           'use more images, or statistics whose sigma is a covariance')
        value = float((mu1 - mu2) @ (mu1 - mu2) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean.real))
    # d^2 >= 0 (a squared norm plus a squared Bures distance); sqrtm is good to about 1e-7 of the traces (Inception
    # features against themselves give -5e-5): a negative within 1e-5 of them reads 0.
    if not np.isfinite(value):
        raise FIDError(f'the distance came out {value}: the statistics are too large for float64')
    if not value >= -1e-5 * (np.trace(sigma1) + np.trace(sigma2)):
        raise FIDError(f'the distance came out {value:.3g}: a sigma is not positive semi-definite, no covariance')
    return max(value, 0.0)


def save_stats(path, mu, sigma, n=None):
    """Writes `path` exactly (np.savez would append .npz), keys mu, sigma (pytorch-fid's) and n, renamed into place
    from this process's own temporary file. OSErrors name `path`."""
    part = f'{path}.{os.getpid()}.part'
    try:
        with open(part, 'wb') as f:
            np.savez(f, mu=mu, sigma=sigma, **({} if n is None else {'n': n}))
        os.replace(part, path)
    except OSError as e:  # a full disk, say
        raise OSError(e.errno, e.strerror, str(path)) from None
    finally:  # never a half-written file left behind
        Path(part).unlink(missing_ok=True)


def load_stats(path, network=False):
    """(mu, sigma, n or None) from a .npz with keys mu [D] and sigma [D, D] (n optional), after check_stats."""
    if not Path(path).is_file():  # only a regular file: np.load would wait forever on a FIFO named x.npz
        raise FIDError(f'{path}: not a regular file; statistics are a .npz file written by --save-stats')
    try:
        with np.load(path) as f:
            mu, sigma, n = (f[k] if k in f.files else None for k in ('mu', 'sigma', 'n'))
        n = n.item() if n is not None and n.ndim == 0 else n  # an array stays one, and check_counts refuses it
        check_counts(n=n)  # --save-stats writes the image count; any other n is not one
    except Exception as e:  # text, a .npy, a damaged zip, an n of [2], ...: numpy fails in many ways
        reason = ('not a .npz archive' if 'pickled' in str(e) or 'context manager' in str(e) else  # or a .npy
                  'object arrays, not numbers' if 'Object' in str(e) else e)  # numpy would advise unpickling either
        raise FIDError(f'{path}: not a readable .npz of statistics ({reason})') from None
    if mu is None or sigma is None:
        raise FIDError(f'{path}: no mu or sigma array; statistics need both (write them with --save-stats)')
    return (*check_stats(mu, sigma, path, network), n)


def reference_stats(ref, model, n=None, batch_size=50, device=None, workers=1, progress=False, size=None):
    """(mu, sigma) of a .npz of statistics (n and size ignored) or of folder_activations(ref, n, size). Those are
    cached, keyed by the folder, n, size, the network's weights and each image's name, size and mtime (rsync's quick
    check), and the folder's earlier states deleted; a damaged cache file is computed again, an unwritable cache
    folder is not used."""
    if not Path(ref).is_dir():
        if str(ref).lower().endswith('.npz'):
            return load_stats(ref, network=True)[:2]
        raise FIDError(f'{ref}: {"neither a folder of images nor a .npz" if Path(ref).exists() else "no such folder"}')
    check_counts(n=n)
    files, started = image_files(ref), time.time()
    weights = getattr(model, 'weights_id', None)  # statistics of other weights are other numbers
    key = f'{STATS_VERSION}\n{Path(ref).resolve()}\n{n}\n{size}\n{weights}\n'
    source = hashlib.sha256(key.encode()).hexdigest()[:12]
    state = hashlib.sha256(''.join(f'{f.relative_to(ref)}\t{st.st_size}\t{st.st_mtime_ns}\n'
                                   for f, st in ((f, f.stat()) for f in files)).encode()).hexdigest()[:12]
    cached = cache_dir() / 'fid-stats' / f'{source}-{state}.npz'  # the folder, n, size and weights, then its state
    if cached.is_file():
        try:
            return load_stats(cached, network=True)[:2]
        except FIDError as e:
            print(f'fid: the cached statistics are damaged ({e}); computing them again', file=sys.stderr)
    chosen = readable_files(ref, n, files)  # before the passes: too few readable images is refused now
    acts = folder_activations(ref, model, n, batch_size, device, workers, progress, size, chosen)
    mu, sigma = statistics(acts)
    try:
        cached.parent.mkdir(parents=True, exist_ok=True)
        save_stats(cached, mu, sigma, len(acts))
        for old in set(cached.parent.glob(f'{source}-*.npz')) - {cached}:  # earlier states, cached before this began
            with contextlib.suppress(OSError):  # (another process may remove it first)
                if old.stat().st_mtime < started:
                    old.unlink()
    except OSError as e:
        print(f'fid: cannot cache the statistics in {cached.parent} ({e.strerror}); not cached', file=sys.stderr)
    return mu, sigma


def fid_from_samples(samples, ref, n, model=None, weights=None, device=None, size=None, reference=None,
                     with_is=False):
    """FID of the first n (None: all) `samples`, float [N, C, H, W] in [-1, 1], against reference_stats(ref, n, size)
    (or `reference`, its (mu, sigma) computed before): give the samples' (H, W) as size, so that a reference folder is
    read as the training data was. with_is: (FID, *inception_score) of the same pass."""
    n = len(samples) if n is None else n
    check_counts(n=n)
    if len(samples) < n:
        raise FIDError(f'{len(samples)} samples, fewer than n = {n}')
    if model is None:
        model = load_inception(weights, device or ('cuda' if torch.cuda.is_available() else 'cpu'))
    acts = activations(samples[:n], model, device=device)
    mu2, sigma2 = reference or reference_stats(ref, model, n=n, device=device, size=size)
    value = frechet_distance(*statistics(acts), mu2, sigma2)
    return (value, *inception_score(model.logits(acts))) if with_is else value


def meter(ref, n, weights=None, device=None, size=None, flag='--fid', names=None):
    """(fid_of, reference, warning) for a program that scores its samples (train.py --fid-every, sample.py --fid):
    fid_of(samples, with_is=False) is the FID of the first n against ref (fid_from_samples; with_is: and their IS);
    `reference` says which images of a folder that compares with (subset_note, and the size they are read at);
    `warning` is bias_warning(n). The network and ref's statistics load now, so a bad one fails before any sampling.
    FIDErrors start with `flag`, and `names` renames fid.py's own flags in them (e.g. {'--weights': '--fid-weights',
    '--n': '--fid-n'})."""
    names = {'--weights': '--fid-weights', '--n': '--n', **(names or {})}

    def said(work, *args, **kwargs):
        try:
            return work(*args, **kwargs)
        except FIDError as e:  # fid.py names its flags first or last in a message, never where a path may stand
            message = re.sub(r'^--weights\b|--weights(?= PATH$)|--n$', lambda m: names[m[0]], str(e))
            raise FIDError(f'{flag}: {message}') from None
    model = said(load_inception, weights, device)
    stats = said(reference_stats, ref, model, n=n, device=device, size=size)  # once: every FID compares with these
    reference = said(subset_note, ref, n) + (f', read at {size[0]}x{size[1]}' if size and Path(ref).is_dir() else '')

    def fid_of(samples, with_is=False):
        return said(fid_from_samples, samples, ref, n, model=model, device=device, size=size, reference=stats,
                    with_is=with_is)
    return fid_of, reference, bias_warning(n)


# --- Command line

class ArgumentParser(argparse.ArgumentParser):
    def error(self, message):  # argparse's errors as one line like every other (its own prints the usage too)
        raise FIDError(message)


def count_flag(name):
    """argparse type for the count COUNTS[name], so that argparse's error names the flag."""
    def parse(text):
        if not text.isdigit() or int(text) < COUNTS[name]:
            raise argparse.ArgumentTypeError(f'{text!r} is not a whole number >= {COUNTS[name]}')
        return int(text)
    return parse


def check_args(args):
    """(device, [(path, (mu, sigma, n) of a .npz or None for a folder)]) after checking every flag and input."""
    if len(args.paths) not in ((1,) if args.save_stats else (1, 2) if args.inception_score else (2,)):
        raise FIDError('--save-stats writes the statistics of one PATH; give exactly one' if args.save_stats
                       else 'give two PATHs to compare, or one PATH and --save-stats OUT.npz or --is')
    if args.save_stats:  # can save_stats write there? Asked now, not after the work
        out = Path(args.save_stats)
        if out.suffix.lower() != '.npz' or (out.exists() and not out.is_file()):
            raise FIDError(f'--save-stats {out}: give a new or regular file whose name ends in .npz')
        try:
            tempfile.TemporaryFile(dir=out.parent).close()  # a nameless file, gone when closed
        except OSError as e:  # a missing folder, a file where the folder should be, no permission
            raise FIDError(f'--save-stats {out}: cannot write in {out.parent} ({e.strerror})') from None
    try:
        device = torch.device(('cuda' if torch.cuda.is_available() else 'cpu') if args.device is None else args.device)
    except RuntimeError:
        raise FIDError(f'--device {args.device}: not a device; use cpu, cuda or cuda:N') from None
    if device.type != 'cpu' and (device.type != 'cuda' or (device.index or 0) >= torch.cuda.device_count()):
        raise FIDError(f'--device {args.device}: not here ({torch.cuda.device_count()} CUDA devices); use cpu')
    inputs = []  # (path, statistics of a .npz, readable_files of a folder)
    for path in args.paths:
        if not os.path.exists(path):
            raise FIDError(f'{path}: no such file or folder')
        if os.path.isdir(path):  # enough readable images? Asked now, not after the first folder's passes
            inputs.append((path, None, readable_files(path, args.n)))
        elif path.lower().endswith('.npz'):
            inputs.append((path, load_stats(path), None))
        else:
            raise FIDError(f'{path}: neither a folder of images nor a .npz of statistics')
    for flag, value in (('--n', args.n), ('--size', args.size), ('--is', args.inception_score)):  # not silently ignored
        if value and all(stats is not None for _, stats, _ in inputs):
            raise FIDError(f'{flag} reads the images of a folder; statistics files were computed already: leave '
                           f'{flag} out')
    dims = [len(stats[0]) if stats else DIMS for _, stats, _ in inputs]  # a folder's are the network's
    if len(set(dims)) > 1:
        raise FIDError(f'{args.paths[0]} is {dims[0]}-d, {args.paths[1]} {dims[1]}-d; compute both with this network')
    return device, inputs


def size_flag(text):
    """argparse type for --size: 32, or HxW like 64x128, as train.py's --size; returned as (H, W)."""
    sides = text.lower().split('x')
    if not (len(sides) <= 2 and all(side.isdigit() and 1 <= int(side) <= 4096 for side in sides)):
        raise argparse.ArgumentTypeError(f'{text!r} is not a size: give 32 or HxW like 64x128 (1 to 4096 a side)')
    return int(sides[0]), int(sides[-1])


def main(argv=None):
    parser = ArgumentParser(description='FID between two folders of images or .npz statistics (keys mu, sigma).')
    parser.add_argument('paths', nargs='+', metavar='PATH', help='a folder of images or a .npz of statistics')
    parser.add_argument('--save-stats', metavar='OUT.npz', help='write the statistics of the one PATH given')
    parser.add_argument('--is', dest='inception_score', action='store_true',
                        help=f'also print the Inception Score of each folder PATH (one PATH: that alone), from the '
                        f'same pass as the FID: torch-fidelity\'s formula, {IS_SPLITS} splits in order (1 under '
                        f'{IS_SPLITS} images). It needs the real fc weights, as in {WEIGHTS_NAME}: a file without them '
                        '(made from a TorchScript port) loads, and gives a meaningless IS')
    parser.add_argument('--n', type=count_flag('n'), help='use N images of each folder, a uniform random draw that is '
                        'the same on every run (the first N sorted names of class folders would be one class)')
    parser.add_argument('--size', type=size_flag, help="read each folder's images as train.py --size reads its data "
                        '(shorter side resized, centre crop) before the resize to 299: compare samples of a 32x32 '
                        'model with the data at 32x32, not at full size, whose detail no sample can have')
    parser.add_argument('--batch-size', type=count_flag('batch_size'), default=50, help='images per batch (default 50)')
    parser.add_argument('--device', help='cpu, cuda, cuda:1, ... (default: cuda if available, else cpu)')
    parser.add_argument('--weights', metavar='PATH', help=f'{WEIGHTS_NAME} (default: $FID_WEIGHTS, cache, download)')
    parser.add_argument('--workers', type=count_flag('workers'), default=1, help='image decoding threads (default 1)')
    try:
        args = parser.parse_args(argv)
        device, inputs = check_args(args)
        model, results = None, []
        for path, stats, chosen in inputs:
            if stats is None:
                model = model or load_inception(args.weights, device)
                if args.n:
                    print(f'fid: {path}: {subset_note(path, args.n)}', file=sys.stderr)
                acts = folder_activations(path, model, args.n, args.batch_size, device, args.workers, True, args.size,
                                          chosen)
                stats = (*statistics(acts), len(acts))
                if args.inception_score:
                    mean, std, splits = inception_score(model.logits(acts))
                    print(f'IS: {mean}  (std {std:.4g}, splits {splits}; n = {len(acts)} from {path})')
            results.append(stats)
        if args.save_stats:
            save_stats(args.save_stats, *results[0])
            count = results[0][2] or 'an unknown number of'  # a .npz without n (pytorch-fid's)
            print(f'saved statistics of {count} images from {args.paths[0]} to {args.save_stats}')
        elif len(results) == 2:  # (one PATH with --is: its IS alone)
            value = frechet_distance(*results[0][:2], *results[1][:2])
            n1, n2 = (stats[2] or '?' for stats in results)
            print(f'FID: {value}  (n = {n1} from {args.paths[0]}, {n2} from {args.paths[1]})')
            warning = bias_warning(min(stats[2] or DIMS for stats in results))
            if warning:
                print(f'fid: warning: {warning}', file=sys.stderr)
        return 0
    except (FIDError, OSError) as e:  # OSError: e.g. a full disk under --save-stats after the checks passed
        print(f'fid.py: error: {e}', file=sys.stderr)
        return 2


if __name__ == '__main__':
    try:
        sys.exit(main())
    except KeyboardInterrupt:  # --save-stats writes only at the end, atomically: no partial file is left
        print('\nfid.py: interrupted', file=sys.stderr)
        sys.exit(130)
