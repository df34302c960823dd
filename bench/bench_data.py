"""The data pipeline: images/s decoded once, loaded back from the disk cache, and delivered per training step.

    python bench/bench_data.py                          # 2000 JPEGs of 512x384, --size 128, batch 128
    python bench/bench_data.py --n 500 --size 256 --batch 64

It writes a synthetic folder of photos-like JPEGs (smooth gradients with shapes, the built-in dataset drawn
large), then times train.py's own functions: load_dataset cold (decode, resize, crop, write the cache),
load_dataset warm (map the cache file), and the per-step path of the training loop (batch_indices, then
batch_images: gather from the memory map, random flips, uint8 to float in [-1, 1]), over the first epoch
with the cache file dropped from the page cache beforehand (read from disk), then over the later epochs.
Compare "delivered" with the training rate of bench_train.py: the pipeline limits training only if it
delivers fewer images/s than the network consumes.
"""
import argparse
import datetime
import glob
import os
import platform
import sys
import tempfile
import time

import numpy as np
import torch
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import data  # noqa: E402


def write_folder(root, n, width, height):
    shapes, _ = data.make_shapes(n, (height // 8, width // 8))
    ramp = np.linspace(0, 1, width)[None, :, None] * np.linspace(0.5, 1, height)[:, None, None]
    for i, small in enumerate(shapes):
        big = np.asarray(Image.fromarray(small).resize((width, height), Image.Resampling.BILINEAR), np.float64)
        im = (big * (0.6 + 0.4 * ramp)).astype(np.uint8)  # a gradient, so the JPEGs are not flat colour
        sub = os.path.join(root, f"part{i % 10}")
        os.makedirs(sub, exist_ok=True)
        Image.fromarray(im).save(os.path.join(sub, f"{i:05d}.jpg"), quality=90)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=2000, help="images in the folder")
    p.add_argument("--source", default="512x384", help="source JPEG size WxH")
    p.add_argument("--size", type=int, default=128, help="training size (train.py --size)")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--steps", type=int, default=200, help="training steps timed for delivery")
    args = p.parse_args()
    width, height = map(int, args.source.split("x"))
    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), platform.processor())
    print(f"# {datetime.date.today()} | {cpu}, {os.cpu_count()} cores, torch {torch.__version__} | {' '.join(sys.argv)}")
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["XDG_CACHE_HOME"] = os.path.join(tmp, "cache")
        folder = os.path.join(tmp, "images")
        write_folder(folder, args.n, width, height)
        targs = argparse.Namespace(data=folder, cond=False, no_cache=False, channels=None)  # load_dataset's flags
        size = (args.size, args.size)
        rows = []
        for what in ("decode (first run, writes the cache)", "cache (later runs: map the file)"):
            start = time.perf_counter()
            images, _, _ = data.load_dataset(targs, size)
            rows.append((what, len(images) / (time.perf_counter() - start)))

            if what.startswith("decode"):  # drop the cache file from the page cache: the first epoch reads the disk
                for path in glob.glob(os.path.join(tmp, "cache", "ddpm-toolkit", "*.npy")):
                    fd = os.open(path, os.O_RDONLY)
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                    os.close(fd)

        epoch = -(-len(images) // args.batch)
        for what, steps in (("first epoch, cold page cache", range(epoch)), ("later epochs", range(epoch, args.steps))):
            start = time.perf_counter()
            for step in steps:
                data.batch_images(images, data.batch_indices(step, args.batch, len(images), 0), torch.device("cpu"), flip=True)
            rows.append((f"delivered per step (batch {args.batch}), {what}", len(steps) * args.batch / (time.perf_counter() - start)))
    print(f"{args.n} JPEGs of {width}x{height} -> {args.size}x{args.size}, {images.numel() / 2**20:.0f} MiB decoded\n")
    print("| stage | images/s |\n|---|---|")
    for what, rate in rows:
        print(f"| {what} | {rate:,.0f} |")


if __name__ == "__main__":
    main()
