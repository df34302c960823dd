import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path, monkeypatch):
    """Keep the decoded-image and FID caches out of the user's home folder."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))


DDP_WORKER = """
import os, sys, torch
sys.path.insert(0, {root!r})
import train, unet
made = []
class Recorded(unet.UNet):  # keep a handle on the training network of this process
    def __init__(self, **kw):
        super().__init__(**kw)
        made.append(self)
unet.UNet = Recorded
train.main(sys.argv[1:])
out = sys.argv[sys.argv.index("--out") + 1]
torch.save(made[0].state_dict(), os.path.join(out, "rank%s.pt" % os.environ["RANK"]))
"""


@pytest.fixture
def ddp_worker(tmp_path):
    """A script for torchrun: train.main(its arguments), then this process's trained weights to OUT/rankR.pt."""
    path = tmp_path / "ddp_worker.py"
    path.write_text(DDP_WORKER.format(root=str(ROOT)))
    return path
