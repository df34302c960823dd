"""FID and wall time of each sampler on one trained MNIST model: which is the best quality for the time?

    python bench/bench_samplers.py runs/mnist_cond/ckpt.pt --n 200

Every configuration starts from the same seed and draws --n samples in batches of 100 (an equal share of
each class, unguided, for a conditional checkpoint), at sample.py's automatic precision; the FID (fid.py)
is against the first --n exported test digits. The last line is a JSON summary.
"""
import argparse
import json
import os
import platform
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import data  # noqa: E402
import fid  # noqa: E402
import sample  # noqa: E402

WEIGHTS = os.path.join(ROOT, "..", "shared", "fid", "pt_inception-2015-12-05.pth")
RUNS = ["ddpm:1000", "ddim:20", "ddim:50", "ddim:100", "dpm++:10", "dpm++:20", "dpm++:50"]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("ckpt")
    p.add_argument("--runs", nargs="+", default=RUNS, help="SAMPLER:STEPS")
    p.add_argument("--n", type=int, default=200, help="samples per sampler (and test digits for the FID)")
    p.add_argument("--test", default=os.path.join(ROOT, "runs", "mnist_png", "test"), help="the exported test digits")
    args = p.parse_args()
    ckpt = data.load_checkpoint(args.ckpt)
    model, diffusion = data.build(ckpt)
    shape = (ckpt["model_config"]["in_ch"], *ckpt["model_config"]["image_size"])
    labels = sample.class_labels(ckpt, None, 0, args.n, nrow=1)
    inception = fid.load_inception(WEIGHTS)
    precision = data.fastest_precision("cpu")
    rows = []
    for run in args.runs:
        sampler, steps = run.split(":")
        g = torch.Generator().manual_seed(0)
        start, out = time.perf_counter(), []
        for i in range(0, args.n, 100):
            b = min(100, args.n - i)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
                out.append(diffusion.sample(model, (b, *shape), generator=g, sampler=sampler, steps=int(steps),
                                            y=None if labels is None else labels[i:i + b]))
        seconds = time.perf_counter() - start
        value = fid.fid_from_samples(torch.cat(out), args.test, args.n, model=inception)
        rows.append({"sampler": sampler, "steps": int(steps), "fid": value, "seconds": seconds, "n": args.n})
        print(f"{run}: FID {value:.2f} (n = {args.n}), {seconds:.1f} s", flush=True)
    base = next((r for r in rows if r["sampler"] == "ddpm"), rows[0])
    print(f"\n{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, {precision}, "
          f"n = {args.n}, {time.strftime('%Y-%m-%d')}\n")
    print("| sampler | steps | FID | FID / ddpm-1000 | wall time (s) | time / ddpm-1000 |\n|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['sampler']} | {r['steps']} | {r['fid']:.2f} | {r['fid'] / base['fid']:.2f} | {r['seconds']:.1f} "
              f"| 1/{base['seconds'] / r['seconds']:.0f} |")
    print(json.dumps({"ckpt": args.ckpt, "precision": precision, "rows": rows}))


if __name__ == "__main__":
    main()
