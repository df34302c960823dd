"""Classifier-free guidance on MNIST: does a guided sample show the digit asked for, and what does it cost in FID?

    python bench/bench_mnist.py --out runs/mnist_cond --minutes 30 -- --cond --steps 2600   # the model
    python bench/bench_cfg.py runs/mnist_cond/ckpt.pt --n 500 --grid docs/mnist_cfg_w3.png

A small CNN is trained here on the MNIST training digits (padded to 32x32 as bench_mnist.py exports them)
and checked on the test digits; it is a measuring tool of this benchmark, never a toolkit dependency. For
each guidance weight w, --n samples (an equal share of each class, sample.py's default sampler) are
labelled by it: the share whose label is the requested class, and the FID (fid.py) against the first --n
test digits. The last line is a JSON summary.
"""
import argparse
import json
import os
import sys
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import data  # noqa: E402
import ddpm  # noqa: E402
import fid  # noqa: E402

MNIST = os.path.join(ROOT, "..", "shared", "data", "mnist.npz")
WEIGHTS = os.path.join(ROOT, "..", "shared", "fid", "pt_inception-2015-12-05.pth")


def digits(split):
    """MNIST images as float [N, 1, 32, 32] in [-1, 1] (zero-padded by 2, as exported) and labels [N]."""
    with np.load(MNIST) as f:
        x, y = f[f"x_{split}"], f[f"y_{split}"]
    x = torch.from_numpy(np.pad(x, ((0, 0), (2, 2), (2, 2)))).float().div(127.5).sub(1).unsqueeze(1)
    return x, torch.from_numpy(y.astype(np.int64))


def classifier():
    return nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(),
                         nn.MaxPool2d(2), nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(),
                         nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                         nn.Linear(32 * 8 * 8, 128), nn.ReLU(), nn.Dropout(0.3), nn.Linear(128, 10))


def train_classifier(path, epochs=3):
    """The digit classifier, trained once (small random shifts, Adam) and cached at `path`; returns it and its
    test accuracy."""
    net = classifier()
    x_test, y_test = digits("test")
    if not os.path.exists(path):
        torch.manual_seed(0)
        x, y = digits("train")
        opt = torch.optim.Adam(net.parameters(), 2e-3)
        steps = epochs * len(x) // 128
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, 2e-3, total_steps=steps)
        for step in range(steps):
            idx = torch.randint(len(x), (128,))
            dx, dy = torch.randint(-2, 3, (2,)).tolist()
            loss = F.cross_entropy(net(torch.roll(x[idx], (dx, dy), (2, 3))), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
        torch.save(net.state_dict(), path)
    net.load_state_dict(torch.load(path, weights_only=True))
    net.eval()
    return net, accuracy(net, x_test, y_test)


@torch.no_grad()
def accuracy(net, x, y):
    return sum((net(x[i:i + 1000]).argmax(1) == y[i:i + 1000]).sum().item() for i in range(0, len(x), 1000)) / len(x)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("ckpt", help="a conditional MNIST checkpoint (train.py --cond on bench_mnist.py's export)")
    p.add_argument("--w", type=float, nargs="+", default=[0, 1, 3, 5], help="guidance weights")
    p.add_argument("--n", type=int, default=500, help="samples per weight (and test digits for the FID)")
    p.add_argument("--test", default=os.path.join(ROOT, "runs", "mnist_png", "test"), help="the exported test digits")
    p.add_argument("--classifier", default=os.path.join(ROOT, "runs", "mnist_classifier.pt"))
    p.add_argument("--grid", help="also write a per-class grid (a row per digit) at this path for w = 3")
    args = p.parse_args()
    torch.manual_seed(0)
    net, test_acc = train_classifier(args.classifier)
    print(f"digit classifier: {100 * test_acc:.2f}% on the 10000 MNIST test digits", flush=True)
    ckpt = data.load_checkpoint(args.ckpt)
    model, diffusion = data.build(ckpt)
    classes = [int(c) for c in ckpt["classes"]]
    inception = fid.load_inception(WEIGHTS)
    precision = data.fastest_precision("cpu")
    rows = []
    for w in args.w:
        g = torch.Generator().manual_seed(0)
        index = torch.arange(args.n) % len(classes)  # class index, an equal share of each
        start, out = time.time(), []
        for i in range(0, args.n, 100):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
                out.append(diffusion.sample(model, (len(index[i:i + 100]), 1, 32, 32), generator=g,
                                            sampler=ddpm.DEFAULT_SAMPLER, steps=ddpm.DEFAULT_STEPS,
                                            y=index[i:i + 100], guidance=w))
        x = torch.cat(out)
        seconds = time.time() - start
        wanted = torch.tensor(classes)[index]
        acc = accuracy(net, x, wanted)
        value = fid.fid_from_samples(x, args.test, args.n, model=inception)
        rows.append({"w": w, "class_match": acc, "fid": value, "n": args.n, "sample_s": round(seconds, 1)})
        print(f"w = {w:g}: {100 * acc:.1f}% show the requested digit, FID {value:.2f} (n = {args.n}, "
              f"{ddpm.DEFAULT_SAMPLER} {ddpm.DEFAULT_STEPS} steps, sampled in {seconds:.0f} s)", flush=True)
        if args.grid and w == 3:
            per_row = 10
            y = torch.arange(len(classes)).repeat_interleave(per_row)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
                grid = diffusion.sample(model, (len(y), 1, 32, 32), generator=torch.Generator().manual_seed(1),
                                        sampler=ddpm.DEFAULT_SAMPLER, steps=ddpm.DEFAULT_STEPS, y=y, guidance=w)
            data.save_grid(grid, args.grid, nrow=per_row)
            print(f"wrote {args.grid}")
    print("| w | requested digit | FID |\n|---|---|---|")
    for r in rows:
        print(f"| {r['w']:g} | {100 * r['class_match']:.1f}% | {r['fid']:.2f} |")
    print(json.dumps({"ckpt": args.ckpt, "classifier_test_acc": test_acc, "sampler": ddpm.DEFAULT_SAMPLER,
                      "steps": ddpm.DEFAULT_STEPS, "precision": precision, "rows": rows}))


if __name__ == "__main__":
    main()
