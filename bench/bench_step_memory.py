"""train.py's step-memory estimate against a real step's peak, on this CPU.

    python bench/bench_step_memory.py                   # tiny, small and paper configurations
    python bench/bench_step_memory.py paper 128 1 fp32  # one: model, size, images per micro-batch, precision

Each configuration runs in its own process: the network, its EMA and AdamW are built, the resident memory is
read, one training step (forward, backward, optimizer step) runs, and the process's peak resident memory
(ru_maxrss) less the memory before the step is set beside train.step_memory's estimate for that micro-batch.
"""
import argparse
import copy
import resource
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import ddpm  # noqa: E402
import train  # noqa: E402
import unet  # noqa: E402

CONFIGS = [("tiny", 32, 32, "fp32"), ("small", 64, 16, "fp32"), ("small", 64, 16, "bf16"), ("paper", 32, 16, "fp32")]


def measure(model, side, micro, precision):
    torch.manual_seed(0)
    net = unet.UNet(**unet.model_config(model, (side, side), 3))
    ema = copy.deepcopy(net)  # noqa: F841  (allocated, as in train.py)
    recipe = unet.preset(model, (side, side))
    diffusion = ddpm.Diffusion(recipe["schedule"], 1000, recipe["target"])
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16")
    before = int(open("/proc/self/statm").read().split()[1]) * resource.getpagesize()
    with autocast:
        loss = diffusion.training_loss(net, torch.rand(micro, 3, side, side) * 2 - 1)
    loss.backward()
    opt.step()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    run = argparse.Namespace(args=argparse.Namespace(channels=3, cond=False), size=(side, side), model=net,
                             device=torch.device("cpu"), autocast=autocast, diffusion=diffusion)
    fixed, per_image = train.step_memory(run)
    print(f"| {model} | {side} | {micro} | {precision} | {(peak - before) / 2**30:.2f} GB | "
          f"{(fixed + micro * per_image) / 2**30:.2f} GB |", flush=True)


if __name__ == "__main__":
    if len(sys.argv) == 5:
        measure(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
    else:
        print("| model | size | images | precision | measured step peak | estimate |\n|---|---|---|---|---|---|")
        for config in CONFIGS:
            subprocess.run([sys.executable, __file__, *map(str, config)], check=True)
