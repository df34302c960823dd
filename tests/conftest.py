import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import fid  # noqa: E402

FIXTURES = Path(__file__).resolve().parent / "fixtures"  # small reference data, in the repository

# The FID Inception weights (91 MB) are not in the repository. They are looked up as fid.py does ($FID_WEIGHTS,
# then the cache file; never a download in a test), once, here: isolated_cache below moves XDG_CACHE_HOME.
try:
    FID_WEIGHTS, NO_WEIGHTS = fid.find_weights(download=False), None
except fid.FIDError as e:
    FID_WEIGHTS, NO_WEIGHTS = None, str(e)


def fid_weights():
    """Path of the FID Inception weights for a test that runs the network. Without them the test is skipped, or
    fails where the weights are required: REQUIRE_FID_WEIGHTS=1 (CI), or a FID_WEIGHTS that names no file."""
    if FID_WEIGHTS is None:
        required = os.environ.get("REQUIRE_FID_WEIGHTS", "0") != "0" or os.environ.get("FID_WEIGHTS")
        (pytest.fail if required else pytest.skip)(
            f"needs the FID Inception weights, e.g. FID_WEIGHTS=/path/to/pt_inception-2015-12-05.pth ({NO_WEIGHTS})")
    return FID_WEIGHTS


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path, monkeypatch):
    """Keep the decoded-image and FID caches out of the user's home folder."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))


DDP_WORKER = """
import json, os, sys, torch
sys.path.insert(0, {root!r})
import train, unet
made, losses, train_step = [], [], train.train_step
class Recorded(unet.UNet):  # keep a handle on the training network of this process
    def __init__(self, **kw):
        super().__init__(**kw)
        made.append(self)
unet.UNet = Recorded
train.train_step = lambda *args: losses.append(train_step(*args)) or losses[-1]  # and this process's step losses
out, rank = sys.argv[sys.argv.index("--out") + 1], os.environ["RANK"]
open(out + ".rank%s.pid" % rank, "w").write(str(os.getpid()))
try:
    train.main(sys.argv[1:])
except SystemExit as e:  # a stopped run: its exit status, for the test to see
    open(out + ".rank%s.exit" % rank, "w").write(str(e.code))
    raise
torch.save(made[0].state_dict(), os.path.join(out, "rank%s.pt" % os.environ["RANK"]))
json.dump([loss.item() for loss in losses], open(os.path.join(out, "rank%s.json" % os.environ["RANK"]), "w"))
"""


@pytest.fixture
def ddp_worker(tmp_path):
    """A script for torchrun: train.main(its arguments), then this process's trained weights to OUT/rankR.pt and
    its step losses to OUT/rankR.json; its process id in OUT.rankR.pid, and the status of a SystemExit in
    OUT.rankR.exit."""
    path = tmp_path / "ddp_worker.py"
    path.write_text(DDP_WORKER.format(root=str(ROOT)))
    return path


@pytest.fixture
def one_thread():
    """Tiny networks run fastest on one thread: two wait for each other on a busy machine (100x slower). Modules of
    them use it for every test (pytestmark)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
