"""Peak resident memory of decoding a large image folder and of training on it, against its decoded size.

    python bench/bench_memory.py --folder /tmp/bench_memory     # 25,000 JPEGs: 4.9 GB decoded at 256x256

The folder (320x256 JPEGs: smooth colour fields with fine noise) is generated once and reused if present.
Each measurement runs in a fresh child process and reports its peak resident set (VmHWM), the resident set
just after data.load_dataset returned, and at its end how much is private (RssAnon) and how much is pages
of mapped files (RssFile: the libraries, and the pages of the image cache read so far, which are clean,
shared by every process of the machine through the page cache, and reclaimable):
  decode    data.load_dataset with an empty cache: decode every file and write the cache
  train     train.main, tiny network, --steps 5 --batch 8 on the whole folder (cache warm)
  baseline  the same training run on 16 of the images: torch, the network and the optimizer themselves
  deliver   the training loop's data path (batch_indices, batch_images) for an epoch from a cold page cache,
            then an epoch warm; no network
train and baseline take turns --repeat times: the peak of identical training runs varies by gigabytes here
(the allocator), so compare their ranges. The aim: under 1.5 GB beyond the baseline, whatever the size.
"""
import argparse
import concurrent.futures
import datetime
import glob
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHILD = """
import argparse, json, sys, time
sys.path.insert(0, {root!r})
import data
import train
def rss(key="VmRSS"):
    return int(next(l for l in open("/proc/self/status") if l.startswith(key + ":")).split()[1]) / 1024
extra, real_load = {{}}, data.load_dataset
def measured_load(*args):
    out = real_load(*args)
    extra["after_load_mb"] = rss()
    return out
data.load_dataset = measured_load
start = time.perf_counter()
{body}
print(json.dumps({{"seconds": time.perf_counter() - start, "peak_mb": rss("VmHWM"), "anon_mb": rss("RssAnon"),
                  "file_mb": rss("RssFile"), **extra}}))
"""
DELIVER = """
import glob, os, torch
for path in glob.glob(os.path.join(os.environ["XDG_CACHE_HOME"], "ddpm-toolkit", "*.npy")):  # a cold page cache
    fd = os.open(path, os.O_RDONLY)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    os.close(fd)
images, _, _ = data.load_dataset(argparse.Namespace(data={folder!r}, cond=False, no_cache=False, channels=None), (256, 256))
epoch = -(-len(images) // {batch})
for what, steps in (("cold", range(epoch)), ("warm", range(epoch, 2 * epoch))):
    t = time.perf_counter()
    for step in steps:
        data.batch_images(images, data.batch_indices(step, {batch}, len(images), 0), torch.device("cpu"), flip=True)
    extra[what] = len(steps) * {batch} / (time.perf_counter() - t)
"""


def write_image(path, seed):
    rng = np.random.default_rng(seed)
    field = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)).resize((320, 256), Image.Resampling.BICUBIC)
    noisy = np.asarray(field, np.int16) + rng.integers(-10, 11, (256, 320, 3))  # texture, so the files are not tiny
    Image.fromarray(noisy.clip(0, 255).astype(np.uint8)).save(path, quality=90)


def make_folder(folder, n):
    paths = [os.path.join(folder, f"part{i % 100:02d}", f"{i:05d}.jpg") for i in range(n)]
    todo = [(p, i) for i, p in enumerate(paths) if not os.path.exists(p)]
    for sub in {os.path.dirname(p) for p, _ in todo}:
        os.makedirs(sub, exist_ok=True)
    if todo:
        with concurrent.futures.ProcessPoolExecutor() as pool:
            list(pool.map(write_image, *zip(*todo), chunksize=64))
    return len(todo)


def child(body, cache, **kw):
    """Run body in a fresh python with XDG_CACHE_HOME=cache; its last stdout line is its measurements."""
    env = {**os.environ, "XDG_CACHE_HOME": cache}
    r = subprocess.run([sys.executable, "-c", CHILD.format(root=ROOT, body=body.format(**kw))],
                       capture_output=True, text=True, env=env)
    if r.returncode:
        sys.exit(f"bench_memory.py: a child failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--folder", required=True, help="where the synthetic images are (generated if missing)")
    p.add_argument("--n", type=int, default=25000, help="images in the folder")
    p.add_argument("--batch", type=int, default=128, help="batch of the deliver measurement")
    p.add_argument("--repeat", type=int, default=3, help="runs of train and of baseline, taking turns")
    args = p.parse_args()
    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), platform.processor())
    print(f"# {datetime.date.today()} | {cpu}, {os.cpu_count()} cores, torch {torch.__version__} | {' '.join(sys.argv)}")
    t = time.perf_counter()
    made = make_folder(args.folder, args.n)
    disk = sum(os.path.getsize(f) for f in glob.glob(os.path.join(args.folder, "*", "*.jpg"))) / 1e9
    print(f"folder: {args.n} JPEGs ({made} generated in {time.perf_counter() - t:.0f} s), {disk:.2f} GB on disk, "
          f"{args.n * 3 * 256 * 256 / 1e9:.2f} GB decoded at 256x256", flush=True)
    work = tempfile.mkdtemp(prefix="bench_memory_")
    try:
        small = os.path.join(work, "small")
        os.makedirs(small)
        for f in sorted(glob.glob(os.path.join(args.folder, "part00", "*.jpg")))[:16]:
            os.symlink(f, os.path.join(small, os.path.basename(f)))
        cache = os.path.join(work, "cache")
        load = "data.load_dataset(argparse.Namespace(data={folder!r}, cond=False, no_cache=False, channels=None), (256, 256))"
        run = ("import shutil; shutil.rmtree({out!r}, ignore_errors=True)\n"
               "train.main(['--data', {folder!r}, '--size', '256', '--model', 'tiny', '--steps', '5', '--batch', '8',"
               " '--sample-n', '1', '--log-every', '5', '--out', {out!r}])")
        rows = [("decode", child(load, cache, folder=args.folder))]
        for i in range(args.repeat):
            rows.append(("train", child(run, cache, folder=args.folder, out=os.path.join(work, "run"))))
            rows.append(("baseline", child(run, os.path.join(work, "cache-small"), folder=small, out=os.path.join(work, "run"))))
            print(*rows[-2:], sep="\n", flush=True)
        rows.append(("deliver", child(DELIVER, cache, folder=args.folder, batch=args.batch)))
        cached = sum(os.path.getsize(f) for f in glob.glob(os.path.join(cache, "ddpm-toolkit", "*"))) / 1e9
    finally:
        shutil.rmtree(work)
    deliver, decode = rows[-1][1], rows[0][1]
    print(f"\ncache file {cached:.2f} GB; decode {args.n / decode['seconds']:.0f} images/s ({decode['seconds']:.0f} s); "
          f"delivered per step (batch {args.batch}, no network): {deliver['cold']:,.0f} images/s over an epoch from a "
          f"cold page cache, {deliver['warm']:,.0f} over the next\n")
    print("| run | seconds | peak RSS MB | RSS after load_dataset MB | at the end: private MB | mapped files MB |")
    print("|---|---|---|---|---|---|")
    for name, r in rows:
        print(f"| {name} | {r['seconds']:.1f} | {r['peak_mb']:.0f} | {r['after_load_mb']:.0f} | {r['anon_mb']:.0f} | {r['file_mb']:.0f} |")


if __name__ == "__main__":
    main()
