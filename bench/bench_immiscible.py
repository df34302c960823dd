"""Immiscible noise assignment (Li et al. 2024): its cost per batch, and FID over training with and without it.

    python bench/bench_immiscible.py cost
    python bench/bench_immiscible.py fid --steps 1500 --fid-every 500 --fid-n 300

`cost` times ddpm.immiscible_noise (the [N, N] distance matrix and scipy's linear_sum_assignment) against
one training step of the tiny preset (forward, backward, Adam, at sample.py's fastest precision) on the same
batch, for 64 and 128 images of 32x32x1 and 64x64x3. `fid` trains two MNIST models (bench_mnist.py's
export, tiny preset, 32x32) that differ only in --immiscible, same seed and data order, and reads the FID
train.py logs every --fid-every steps (EMA weights, sample.py's default sampler, --fid-n samples against
the first --fid-n test digits). The last line is a JSON summary.
"""
import argparse
import json
import os
import subprocess
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import data  # noqa: E402
import ddpm  # noqa: E402
import unet  # noqa: E402
from bench_mnist import WEIGHTS, export  # noqa: E402


def timed(fn, repeat):
    fn()  # warm-up
    start = time.perf_counter()
    for _ in range(repeat):
        fn()
    return (time.perf_counter() - start) / repeat


def cost():
    precision = data.fastest_precision("cpu")
    rows = []
    for n, c, size in ((64, 1, 32), (128, 1, 32), (64, 3, 64), (128, 3, 64)):
        torch.manual_seed(0)
        x0, noise = torch.rand(n, c, size, size) * 2 - 1, torch.randn(n, c, size, size)
        model = unet.UNet(**unet.model_config("tiny", (size, size), c))
        opt = torch.optim.Adam(model.parameters())
        diffusion = ddpm.Diffusion()

        def step():
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
                loss = diffusion.training_loss(model, x0)
            opt.zero_grad()
            loss.backward()
            opt.step()

        assign = timed(lambda: ddpm.immiscible_noise(x0, noise), 10)
        train = timed(step, 2)
        rows.append({"batch": n, "image": f"{c}x{size}x{size}", "assign_ms": 1e3 * assign, "step_ms": 1e3 * train,
                     "share": assign / train})
        print(f"{n} x {c}x{size}x{size}: assignment {1e3 * assign:.1f} ms, tiny {precision} train step "
              f"{1e3 * train:.0f} ms: {100 * assign / train:.2f}% of the step", flush=True)
    print(json.dumps({"precision": precision, "threads": torch.get_num_threads(), "rows": rows}))


def fid(args):
    export(args.data)
    curves = {}
    for name, extra in (("plain", []), ("immiscible", ["--immiscible"])):
        out = os.path.join(args.out, name)
        cmd = [sys.executable, os.path.join(ROOT, "train.py"), "--data", os.path.join(args.data, "train"), "--size",
               "32", "--model", "tiny", "--steps", str(args.steps), "--sample-every", str(args.steps), "--out", out,
               "--fid-every", str(args.fid_every), "--fid-ref", os.path.join(args.data, "test"), "--fid-n",
               str(args.fid_n), "--fid-weights", WEIGHTS, *extra]
        print(" ".join(cmd), flush=True)
        subprocess.run(cmd, check=True)
        with open(os.path.join(out, "metrics.jsonl")) as f:
            curves[name] = {m["step"]: m["fid"] for m in map(json.loads, f) if "fid" in m}
    print(f"\nFID (n = {args.fid_n}, EMA, {ddpm.DEFAULT_SAMPLER} {ddpm.DEFAULT_STEPS} steps)\n")
    print("| step | plain | --immiscible |\n|---|---|---|")
    for step in sorted(curves["plain"]):
        print(f"| {step} | {curves['plain'][step]:.2f} | {curves['immiscible'].get(step, float('nan')):.2f} |")
    print(json.dumps({"fid_n": args.fid_n, "steps": args.steps, "curves": curves}))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=("cost", "fid"))
    p.add_argument("--out", default=os.path.join(ROOT, "runs", "immiscible"), help="fid: the two run folders' parent")
    p.add_argument("--data", default=os.path.join(ROOT, "runs", "mnist_png"), help="fid: where MNIST is exported")
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--fid-every", type=int, default=500)
    p.add_argument("--fid-n", type=int, default=300)
    args = p.parse_args()
    cost() if args.what == "cost" else fid(args)


if __name__ == "__main__":
    main()
