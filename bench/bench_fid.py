"""Throughput of fid.py end to end: 1000 MNIST test images as 28x28 RGB PNGs (the slow test's folder),
decoded, resized to 299x299 and run through the FID Inception by the command line, as a user would run it.

    python bench/bench_fid.py                                  # fid.py
    python bench/bench_fid.py --pytorch-fid /tmp/pfid/bin/python   # and pytorch-fid's CLI beside it

The time includes starting Python, importing torch and loading the weights. The images/s that fid.py's
progress line reports (network and decoding only) is printed too. The machine is shared: the load average
is printed before each run, so read numbers taken under load with care.
"""
import argparse
import datetime
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / 'shared'
WEIGHTS = SHARED / 'fid' / 'pt_inception-2015-12-05.pth'


def cpu_model():
    for line in Path('/proc/cpuinfo').read_text().splitlines():
        if line.startswith('model name'):
            return line.split(':', 1)[1].strip()
    return platform.processor() or 'unknown'


def timed(command, env):
    print(f'load average before: {os.getloadavg()[0]:.2f}')
    print('$ ' + ' '.join(map(str, command)), flush=True)
    start = time.perf_counter()
    result = subprocess.run(list(map(str, command)), capture_output=True, text=True, env=env)
    seconds = time.perf_counter() - start
    if result.returncode != 0:
        sys.exit(f'failed ({result.returncode}):\n{result.stderr}')
    return seconds, result.stderr


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--n', type=int, default=1000, help='MNIST test images (default 1000)')
    parser.add_argument('--batch-size', type=int, default=50)
    parser.add_argument('--workers', type=int, default=1)
    parser.add_argument('--pytorch-fid', metavar='PYTHON', help='a Python with pytorch-fid 0.3.0, to time it too')
    args = parser.parse_args()
    for path in (WEIGHTS, SHARED / 'data' / 'mnist.npz'):
        if not path.exists():
            sys.exit(f'{path} is missing: clone the shared folder beside the repository (../shared)')

    print(f'date: {datetime.datetime.now().isoformat(timespec="seconds")}')
    print(f'machine: {cpu_model()}, {os.cpu_count()} CPUs, torch {torch.__version__} with '
          f'{torch.get_num_threads()} threads, Python {platform.python_version()}')
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        folder = tmp / 'mnist'
        folder.mkdir()
        with np.load(SHARED / 'data' / 'mnist.npz') as f:
            for i, image in enumerate(f['x_test'][:args.n]):
                Image.fromarray(np.repeat(image[..., None], 3, axis=2), 'RGB').save(folder / f'{i:05d}.png')
        env = dict(os.environ, XDG_CACHE_HOME=str(tmp / 'cache'))

        seconds, stderr = timed([sys.executable, ROOT / 'fid.py', folder, '--save-stats', tmp / 'a.npz',
                                 '--weights', WEIGHTS, '--device', 'cpu', '--batch-size', args.batch_size,
                                 '--workers', args.workers], env)
        rates = re.findall(r'([\d.]+) images/s', stderr)
        print(f'fid.py: {args.n} images in {seconds:.1f} s = {args.n / seconds:.2f} images/s end to end '
              f'({rates[-1] if rates else "?"} images/s after start-up, from its progress line)\n')

        if args.pytorch_fid:
            # pytorch-fid looks for its weights in torch.hub's cache: point it at the shared file, no download.
            hub = tmp / 'torch' / 'hub' / 'checkpoints'
            hub.mkdir(parents=True)
            (hub / 'pt_inception-2015-12-05-6726825d.pth').symlink_to(WEIGHTS)
            seconds, _ = timed([args.pytorch_fid, '-m', 'pytorch_fid', '--save-stats', folder, tmp / 'b.npz',
                                '--device', 'cpu', '--batch-size', args.batch_size],
                               dict(env, TORCH_HOME=str(tmp / 'torch')))
            print(f'pytorch-fid: {args.n} images in {seconds:.1f} s = {args.n / seconds:.2f} images/s end to end')
            with np.load(tmp / 'a.npz') as a, np.load(tmp / 'b.npz') as b:
                print(f'max |mu difference| {np.abs(a["mu"] - b["mu"]).max():.2e}, '
                      f'max |sigma difference| {np.abs(a["sigma"] - b["sigma"]).max():.2e}')


if __name__ == '__main__':
    main()
