"""MNIST under a fixed CPU budget: train for --minutes, then a sample grid and an FID against the test set.

    python bench/bench_mnist.py --out runs/mnist15 --minutes 15                  # tiny preset, the defaults
    python bench/bench_mnist.py --out runs/mnist15_eps --minutes 15 -- --target eps  # anything after -- goes to train.py
    python bench/bench_mnist.py --out runs/mnist_time15 --minutes 20 -- --time 15m    # a budget train.py plans itself

The MNIST digits of ../shared/data/mnist.npz are exported once as 32x32 PNGs (28x28 padded with 2 black
pixels, as LeNet did): train in one folder per class, test flat. train.py runs on the train folder without
horizontal flips (a mirrored digit is not a digit); after
--minutes it gets Ctrl-C (SIGINT), which saves the checkpoint, the same path a user takes. Then sample.py
writes a 64-image grid and the FID (fid.py, --fid-n samples against a seeded uniform random --fid-n of the 10,000
test digits, as sample.py --fid draws a reference folder).
Everything, with the loss curve, lands in --out; the last line is a JSON summary.
"""
import argparse
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MNIST = os.path.join(ROOT, "..", "shared", "data", "mnist.npz")
WEIGHTS = os.path.join(ROOT, "..", "shared", "fid", "pt_inception-2015-12-05.pth")


def export(folder, mnist=MNIST):
    """mnist.npz -> folder/train/<digit>/<index>.png and folder/test/<index>.png at 32x32, once."""
    done = os.path.join(folder, "done")
    if os.path.exists(done):
        return
    with np.load(mnist) as f:
        for split in ("train", "test"):
            images, labels = f[f"x_{split}"], f[f"y_{split}"]
            for i, (im, y) in enumerate(zip(images, labels)):
                # train: a folder per class (for --cond); test: flat
                sub = os.path.join(folder, split, str(y) if split == "train" else "")
                os.makedirs(sub, exist_ok=True)
                Image.fromarray(np.pad(im, 2)).save(os.path.join(sub, f"{i:05d}.png"))
    open(done, "w").close()


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="run folder")
    p.add_argument("--minutes", type=float, default=15, help="training budget (wall clock, data loading included)")
    p.add_argument("--data", default=os.path.join(ROOT, "runs", "mnist_png"), help="where the PNGs are exported")
    p.add_argument("--fid-n", type=int, default=500, help="samples for the FID (and test digits)")
    p.add_argument("train_args", nargs="*", help="extra train.py flags, after --")
    args = p.parse_args()
    export(args.data)
    length = [] if "--time" in args.train_args else ["--steps", "1000000"]  # --time plans the steps itself
    cmd = [sys.executable, os.path.join(ROOT, "train.py"), "--data", os.path.join(args.data, "train"), "--size", "32",
           "--model", "tiny", *length, "--sample-every", "0", "--ckpt-every", "500", "--out", args.out,
           "--no-flip",  # a mirrored 2, 3 or 5 is not a digit
           *args.train_args]
    print(" ".join(cmd), flush=True)
    start = time.time()
    proc = subprocess.Popen(cmd)
    try:
        proc.wait(timeout=args.minutes * 60)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGINT)  # train.py finishes the step, saves and exits
        proc.wait()
    trained = time.time() - start
    ckpt = os.path.join(args.out, "ckpt.pt")
    grid = os.path.join(args.out, "samples.png")
    subprocess.run([sys.executable, os.path.join(ROOT, "sample.py"), ckpt, "--grid", grid], check=True)
    fid = subprocess.run([sys.executable, os.path.join(ROOT, "sample.py"), ckpt, "--n", str(args.fid_n), "--grid",
                          os.path.join(args.out, "fid_samples.png"), "--fid", os.path.join(args.data, "test"),
                          "--fid-weights", WEIGHTS], check=True, capture_output=True, text=True).stdout
    line = fid.strip().splitlines()[-1]
    print(line)
    with open(os.path.join(args.out, "metrics.jsonl")) as f:
        last = [m for m in map(json.loads, f) if "loss" in m][-1]
    import torch  # only for the step count of the checkpoint
    step = torch.load(ckpt, map_location="cpu", weights_only=True)["step"]
    print(json.dumps({"out": args.out, "train_wall_s": round(trained), "steps": step, "last_loss": last["loss"],
                      "img_per_s": last["img_per_s"], "fid": float(line.split()[1]), "fid_line": line}))


if __name__ == "__main__":
    main()
