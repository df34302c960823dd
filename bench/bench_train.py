"""Training throughput (images/s) and peak memory of one train step, per network, precision and compile.

    python bench/bench_train.py                       # the default table
    python bench/bench_train.py --runs tiny:fp32:eager paper:fp32:eager --batch 32 --steps 5

Each configuration runs in a fresh subprocess (so peak RSS is its own): Adam, the eps-MSE loss of
ddpm.py, batch at 32x32x3, two warm-up steps (compilation happens there), then --steps timed steps.
"""
import argparse
import datetime
import json
import os
import platform
import resource
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def one(preset, precision, mode, batch, steps):
    import torch
    import ddpm
    import unet
    torch.manual_seed(0)
    model = unet.UNet(**unet.model_config(preset, (32, 32), 3))
    diffusion = ddpm.Diffusion()
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    net = torch.compile(model) if mode == "compile" else model
    x = torch.rand(batch, 3, 32, 32) * 2 - 1
    times, losses = [], []
    for i in range(2 + steps):
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            loss = diffusion.training_loss(net, x)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
        losses.append(loss.item())
    timed = sum(times[2:])
    return {"run": f"{preset}:{precision}:{mode}", "img_per_s": batch * steps / timed, "first_steps_s": times[:2],
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "batch": batch, "steps": steps}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", nargs="+", default=["tiny:fp32:eager", "tiny:fp32:compile", "tiny:bf16:eager",
                                                   "small:fp32:eager", "paper:fp32:eager"])
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(one(*args.child.split(":"), args.batch, args.steps)))
        return
    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), platform.processor())
    import torch
    print(f"# {datetime.date.today()} | {cpu}, {os.cpu_count()} cores, torch {torch.__version__} threads "
          f"{torch.get_num_threads()} | {' '.join(sys.argv)}")
    print("| run | images/s | peak RSS MB | first two steps (s) |\n|---|---|---|---|")
    for run in args.runs:
        out = subprocess.run([sys.executable, __file__, "--child", run, "--batch", str(args.batch), "--steps", str(args.steps)],
                             capture_output=True, text=True)
        if out.returncode:
            print(f"| {run} | failed: {out.stderr.strip().splitlines()[-1]} | | |")
            continue
        r = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"| {run} | {r['img_per_s']:.1f} | {r['peak_rss_mb']:.0f} | {r['first_steps_s'][0]:.1f}, {r['first_steps_s'][1]:.1f} |", flush=True)


if __name__ == "__main__":
    main()
