"""Training throughput (images/s) and peak memory of one train step, per network, precision and compile.

    python bench/bench_train.py                       # the default table
    python bench/bench_train.py --runs tiny:fp32:eager paper:fp32:eager --batch 32 --steps 5

    # side by side with diffusers' UNet2DModel built as the same paper network (a separate venv: diffusers
    # is never a dependency of this toolkit)
    python -m venv --system-site-packages /tmp/dvenv && /tmp/dvenv/bin/pip install diffusers
    /tmp/dvenv/bin/python bench/bench_train.py --runs paper:fp32:eager diffusers:fp32:eager --steps 3 --repeat 3

Each configuration runs in a fresh subprocess (so peak RSS is its own): Adam, the eps-MSE loss of
ddpm.py, batch at 32x32x3, --warmup untimed steps (compilation happens there), then --steps timed steps.
With --repeat the configurations take turns, so a slow spell of a shared machine hits them alike.
A run is NETWORK:PRECISION:MODE[:BATCH] with NETWORK a unet.py preset or `diffusers`, PRECISION fp32 or bf16
(autocast), MODE eager, compile or channels_last (network and input in that memory format), BATCH over --batch.

    python bench/bench_train.py --channels 1 --repeat 3 --steps 20 --runs tiny:bf16:eager tiny:bf16:channels_last \
        tiny:bf16:eager:64 tiny:bf16:compile   # issue 32's candidate 7, MNIST's shape
"""
import argparse
import datetime
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def diffusers_paper_unet():
    """Ho et al.'s CIFAR-10 network in diffusers' terms, as google/ddpm-cifar10-32 configures it."""
    from diffusers import UNet2DModel
    return UNet2DModel(sample_size=32, in_channels=3, out_channels=3, block_out_channels=(128, 256, 256, 256),
                       down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
                       layers_per_block=2, norm_eps=1e-6, dropout=0.1, flip_sin_to_cos=False, freq_shift=1,
                       attention_head_dim=None, downsample_padding=0)  # one head, as in the paper


def one(preset, precision, mode, batch, warmup, steps, channels):
    import torch
    import ddpm
    import unet
    torch.manual_seed(0)
    if preset == "diffusers":
        model = diffusers_paper_unet()
        forward = lambda x, t, y=None: model(x, t).sample
    else:
        model = unet.UNet(**unet.model_config(preset, (32, 32), channels))
        forward = model
    diffusion = ddpm.Diffusion()
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    net = torch.compile(forward) if mode == "compile" else forward
    x = torch.rand(batch, channels, 32, 32) * 2 - 1
    if mode == "channels_last":
        model, x = model.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
    times = []
    for i in range(warmup + steps):
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            loss = diffusion.training_loss(net, x)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
    timed = sum(times[warmup:])
    return {"run": f"{preset}:{precision}:{mode}:{batch}", "params": sum(p.numel() for p in model.parameters()), "img_per_s": batch * steps / timed, "first_steps_s": times[:2],
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "batch": batch, "steps": steps}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", nargs="+", default=["tiny:fp32:eager", "tiny:fp32:compile", "tiny:bf16:eager",
                                                   "small:fp32:eager", "paper:fp32:eager"])
    p.add_argument("--batch", type=int, default=32, help="images a step, unless the run gives its own")
    p.add_argument("--channels", type=int, default=3, help="image channels (MNIST: 1)")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps first (compilation; glibc's allocator "
                   "returns large freed blocks to the OS until its threshold adapts, about 4 steps)")
    p.add_argument("--steps", type=int, default=5, help="timed steps per run")
    p.add_argument("--repeat", type=int, default=1, help="rounds of all runs, taken in turn")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        preset, precision, mode, batch = (args.child + f":{args.batch}").split(":")[:4]
        print(json.dumps(one(preset, precision, mode, int(batch), args.warmup, args.steps, args.channels)))
        return
    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), platform.processor())
    import torch
    print(f"# {datetime.date.today()} | {cpu}, {os.cpu_count()} cores, torch {torch.__version__} threads "
          f"{torch.get_num_threads()} | {' '.join(sys.argv)}")
    results = {run: [] for run in args.runs}
    for _ in range(args.repeat):
        for run in args.runs:
            out = subprocess.run([sys.executable, __file__, "--child", run, "--batch", str(args.batch), "--warmup",
                                  str(args.warmup), "--steps", str(args.steps), "--channels", str(args.channels)],
                                 capture_output=True, text=True)
            if out.returncode:
                sys.exit(f"{run} failed: {out.stderr.strip().splitlines()[-1]}")
            results[run].append(json.loads(out.stdout.strip().splitlines()[-1]))
    print("| run | parameters | images/s median (best) | peak RSS MB | first two steps (s) |\n|---|---|---|---|---|")
    for run, rs in results.items():
        rates = sorted(r["img_per_s"] for r in rs)
        first = rs[0]["first_steps_s"]
        print(f"| {run} | {rs[0]['params']:,} | {statistics.median(rates):.2f} ({rates[-1]:.2f}) | "
              f"{max(r['peak_rss_mb'] for r in rs):.0f} | {first[0]:.1f}, {first[1]:.1f} |")


if __name__ == "__main__":
    main()
