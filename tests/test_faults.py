"""Data parallel training with torchrun (2 CPU processes, gloo), faults during training, and bad input."""
import json
import os
import signal
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import data
import ddpm
import train
from test_train import TINY, folder, one_line_error, run  # noqa: F401  (folder is a fixture)

ROOT = Path(__file__).resolve().parents[1]


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


# --- distributed -----------------------------------------------------------------------------------------
def test_two_gloo_processes_hold_identical_weights_and_resume_in_one(folder, tmp_path, ddp_worker):
    out, worker = tmp_path / "ddp", ddp_worker
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        str(worker), "--data", str(folder), "--out", str(out), "--steps", "4", *TINY],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "batch 4 = 2 process(es) x 1 accumulation x 2" in r.stdout
    assert r.stdout.count("done:") == 1  # rank 0 alone logs and writes
    rank0, rank1, ckpt = load(out / "rank0.pt"), load(out / "rank1.pt"), load(out / "ckpt.pt")
    assert ckpt["step"] == 4 and not any(k.startswith(("module.", "_orig_mod.")) for k in ckpt["model"])
    for name in rank0:
        assert torch.equal(rank0[name], rank1[name]), name  # DDP kept the processes in step
        assert torch.equal(rank0[name], ckpt["model"][name]), name
    losses = np.array([json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)])  # [rank, step]
    logged = [m["loss"] for m in map(json.loads, open(out / "metrics.jsonl"))]  # --log-every 2
    assert losses[0, 0] != losses[1, 0]  # each process's share of the batch has its own loss; logged: their mean
    np.testing.assert_allclose(logged, losses.reshape(2, 2, 2).mean((0, 2)), rtol=1e-6)  # summed in fp32 on the device

    train.main(["--out", str(out), "--resume", "--steps", "6"])  # a different number of processes: one
    assert load(out / "ckpt.pt")["step"] == 6


def test_a_signal_to_one_process_stops_all_at_one_step_with_its_status(folder, tmp_path, ddp_worker):
    out = tmp_path / "ddp"
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                             str(ddp_worker), "--data", str(folder), "--out", str(out), "--steps", "100000", *TINY],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.time() + 120
    while not (out / "metrics.jsonl").exists() and time.time() < deadline:  # written after the first step
        time.sleep(0.1)
    os.kill(int((tmp_path / "ddp.rank1.pid").read_text()), signal.SIGTERM)
    log = proc.communicate(timeout=120)[0]
    assert [(tmp_path / f"ddp.rank{r}.exit").read_text() for r in (0, 1)] == ["143", "143"], log[-2000:]
    step = load(out / "ckpt.pt")["step"]
    assert f"stopped by SIGTERM: saved {out / 'ckpt.pt'} at step {step}" in log


# --- faults ----------------------------------------------------------------------------------------------
KILL_WORKER = """
import sys, time, torch
sys.path.insert(0, {root!r})
import train
real_save, calls = torch.save, []
def slow_save(state, f):  # the second checkpoint: half written, then a hang as on a slow disk
    calls.append(1)
    if len(calls) == 1:
        return real_save(state, f)
    import io
    buf = io.BytesIO()
    real_save(state, buf)
    f.write(buf.getvalue()[: len(buf.getvalue()) // 2])
    f.flush()
    open({marker!r}, "w").close()
    time.sleep(120)
torch.save = slow_save
train.main(sys.argv[1:])
"""


def test_sigkill_while_writing_a_checkpoint_keeps_the_last_good_one(folder, tmp_path):
    out, marker = tmp_path / "run", tmp_path / "writing"
    worker = tmp_path / "worker.py"
    worker.write_text(KILL_WORKER.format(root=str(ROOT), marker=str(marker)))
    proc = subprocess.Popen([sys.executable, str(worker), "--data", str(folder), "--out", str(out), "--steps", "9", *TINY,
                             "--snapshot", "0"],  # no snapshot.pt: the second torch.save is the step-6 checkpoint
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 240
        while not marker.exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        assert marker.exists(), "the worker never reached its second checkpoint"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        proc.kill()
    assert (out / "ckpt.pt.tmp").stat().st_size > 0  # the half-written file is there, and was never renamed
    assert load(out / "ckpt.pt")["step"] == 3  # TINY saves every 3 steps: the step-3 checkpoint survived
    train.main(["--out", str(out), "--resume", "--steps", "9"])
    assert load(out / "ckpt.pt")["step"] == 9 and not (out / "ckpt.pt.tmp").exists()


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full (Linux) to fill a disk")
def test_a_full_disk_while_saving_leaves_the_previous_checkpoint(folder, tmp_path):
    out = tmp_path / "run"
    train.main(["--data", str(folder), "--out", str(out), "--steps", "3", *TINY])
    before = (out / "ckpt.pt").read_bytes()
    os.symlink("/dev/full", out / "ckpt.pt.tmp")  # every write to the next checkpoint fails with ENOSPC
    r = run("train.py", "--out", out, "--resume", "--steps", "6")
    one_line_error(r, "No space left on device", "ckpt.pt, the previous checkpoint, is untouched", "--resume")
    assert (out / "ckpt.pt").read_bytes() == before and not os.path.lexists(out / "ckpt.pt.tmp")
    train.main(["--out", str(out), "--resume", "--steps", "6"])
    assert load(out / "ckpt.pt")["step"] == 6


def test_a_disk_without_room_for_a_checkpoint_is_refused_before_training(folder, tmp_path, monkeypatch, capsys):
    real = train.shutil.disk_usage
    monkeypatch.setattr(train.shutil, "disk_usage", lambda p: real(p)._replace(free=2**20))  # 1 MB left
    with pytest.raises(SystemExit) as e:
        train.main(["--data", str(folder), "--out", str(tmp_path / "run"), "--steps", "3", *TINY])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1 and "1.0 MB free, a checkpoint needs about" in err
    assert not (tmp_path / "run").exists()  # no step ran: a refused start leaves nothing


def test_a_first_checkpoint_that_cannot_be_written_says_what_can_be_done(folder, tmp_path, monkeypatch, capsys):
    def full(path, write, tmp=None):  # as a disk filled by another program during training
        raise OSError(28, "No space left on device", path)
    monkeypatch.setattr(data, "write_atomically", full)
    with pytest.raises(SystemExit) as e:
        train.main(["--data", str(folder), "--out", str(tmp_path / "run"), "--steps", "3", *TINY])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "No space left on device" in err
    assert "no checkpoint was written: free disk space, then start a new --out" in err and "--resume" not in err


@pytest.mark.parametrize("fault", ["loss", "gradient"])
def test_a_non_finite_step_stops_the_run_and_keeps_the_good_checkpoint(folder, tmp_path, monkeypatch, capsys, fault):
    real, calls = ddpm.Diffusion.training_loss, []

    def faulty(self, model, *a, **k):
        loss = real(self, model, *a, **k)
        calls.append(1)
        if len(calls) == 5:
            if fault == "loss":
                return loss * float("nan")
            w = next(model.parameters()).flatten()[0]
            return loss + (w - w.detach()).abs().sqrt()  # value unchanged, gradient NaN (sqrt' at 0)
        return loss

    monkeypatch.setattr(ddpm.Diffusion, "training_loss", faulty)
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as e:
        train.main(["--data", str(folder), "--out", str(out), "--steps", "9", *TINY])
    assert e.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert f"{fault} became" in err and "at step 5" in err and "ckpt.pt" in err
    ckpt = load(out / "ckpt.pt")
    assert ckpt["step"] == 3 and all(torch.isfinite(t).all() for t in ckpt["model"].values())


# --- bad images --------------------------------------------------------------------------------------------
def png_claiming(width, height):
    """A PNG header announcing width x height pixels with almost no data: a decompression bomb's calling card."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def test_unusual_images_load_as_rgb_at_the_size(tmp_path):
    size = (16, 16)
    rgb = np.zeros((40, 30, 3), np.uint8)
    rgb[..., 0] = 200
    Image.fromarray(rgb).convert("CMYK").save(tmp_path / "cmyk.jpg")
    Image.fromarray(np.full((20, 20), 65535, np.uint16)).save(tmp_path / "grey16.png")
    Image.fromarray(rgb).convert("P", palette=Image.Palette.ADAPTIVE).save(tmp_path / "palette.png")
    rgba = np.zeros((20, 20, 4), np.uint8)  # fully transparent: must become white, not black
    Image.fromarray(rgba).save(tmp_path / "rgba.png")
    frames = [Image.new("RGB", (20, 20), c) for c in ((0, 0, 255), (255, 0, 0))]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:])
    Image.fromarray(rgb[:6, :5]).save(tmp_path / "small.png")  # smaller than --size: scaled up
    Image.fromarray(np.zeros((200, 90, 3), np.uint8)).save(tmp_path / "tall.png")  # a different size again

    got = {p.name: data.read_image(str(p), size) for p in tmp_path.iterdir()}
    for name, arr in got.items():
        assert arr.shape == (16, 16, 3) and arr.dtype == np.uint8, name
    assert abs(int(got["cmyk.jpg"][8, 8, 0]) - 200) < 8 and got["cmyk.jpg"][8, 8, 1:].max() < 10
    assert (got["grey16.png"] == 255).all() and (got["rgba.png"] == 255).all()
    assert (got["anim.gif"][..., 2] > 240).all() and (got["anim.gif"][..., 0] < 15).all()  # first frame
    assert (got["palette.png"][..., 0] > 190).all() and (got["small.png"][..., 0] == 200).all()


def test_sixteen_bit_grey_keeps_its_range_and_transparency(tmp_path, monkeypatch):
    grey = np.full((8, 8), 40000, np.uint16)
    grey[:4] = 0
    Image.fromarray(grey).save(tmp_path / "g.pgm")  # Pillow opens it as mode I, as a 16-bit PNG in older Pillow
    Image.fromarray(grey).save(tmp_path / "t.png", transparency=0)
    assert (data.read_image(str(tmp_path / "g.pgm"), (8, 8))[4:] == 40000 // 257).all()
    assert (data.read_image(str(tmp_path / "t.png"), (8, 8))[:4] == 255).all()  # transparent: on white
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)  # Pillow's way to turn its limit off
    assert data.read_image(str(tmp_path / "g.pgm"), (8, 8)).shape == (8, 8, 3)


def test_broken_images_are_skipped_with_their_reason(tmp_path):
    (tmp_path / "zero.png").write_bytes(b"")
    (tmp_path / "bomb.png").write_bytes(png_claiming(40000, 40000))
    (tmp_path / "small_bomb.png").write_bytes(png_claiming(10000, 10000))  # over Pillow's limit, under twice it
    good = np.asarray(Image.new("RGB", (20, 20), (9, 40, 90)))
    buf = tmp_path / "good.png"
    Image.fromarray(good).save(buf)
    (tmp_path / "truncated.png").write_bytes(buf.read_bytes()[:60])
    for name, why in (("bomb.png", "DecompressionBomb"), ("small_bomb.png", "decompression-bomb limit"),
                      ("zero.png", "not a readable image"),
                      ("truncated.png", "not a readable image")):
        with pytest.raises(ValueError, match=why):
            data.read_image(str(tmp_path / name), (16, 16))
    r = run("train.py", "--data", tmp_path, "--out", tmp_path.parent / f"{tmp_path.name}-run", "--steps", "1", *TINY)
    assert r.returncode == 0, r.stderr
    assert "skipped 4 unreadable image file(s)" in r.stdout and "1 images 3x16x16" in r.stdout
    assert "Warning" not in r.stderr, r.stderr  # Pillow's bomb warning is not a line of its own


def test_a_symlink_loop_in_the_data_folder_is_walked_once(tmp_path):
    (tmp_path / "a").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "a" / "x.png")
    os.symlink(tmp_path, tmp_path / "a" / "loop")
    assert data.find_images(str(tmp_path)) == [str(tmp_path / "a" / "x.png")]


# --- bad flags and checkpoints -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ckpt")
    (tmp / "data").mkdir()
    Image.new("RGB", (16, 16), (50, 60, 70)).save(tmp / "data" / "a.png")
    Image.new("RGB", (16, 16), (90, 60, 70)).save(tmp / "data" / "b.png")
    train.main(["--data", str(tmp / "data"), "--out", str(tmp / "run"), "--steps", "1", *TINY])
    return tmp / "run" / "ckpt.pt"


def test_unknown_flag(tmp_path):
    one_line_error(run("train.py", "--out", tmp_path / "r", "--lerning-rate", "1"), "unrecognized arguments", "--lerning-rate")
    one_line_error(run("sample.py", "x.pt", "--sampler", "euler"), "--sampler", "euler")


def test_checkpoint_of_a_different_architecture(checkpoint, tmp_path):
    ckpt = load(checkpoint)
    ckpt["model_config"]["ch"] = 64  # weights of a 32-channel network, a config claiming 64
    torch.save(ckpt, tmp_path / "other.pt")
    one_line_error(run("sample.py", tmp_path / "other.pt"), "do not fit")


def test_truncated_checkpoint(checkpoint, tmp_path):
    data = checkpoint.read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    one_line_error(run("sample.py", tmp_path / "cut.pt"), "cut.pt", "not a loadable checkpoint")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "ckpt.pt").write_bytes(data[: len(data) // 3])
    one_line_error(run("train.py", "--out", run_dir, "--resume"), "not a loadable checkpoint")


def test_a_decompression_bomb_to_sample_from_is_one_line(checkpoint, tmp_path):
    (tmp_path / "bomb.png").write_bytes(png_claiming(10000, 10000))  # between Pillow's limit and twice it
    r = run("sample.py", checkpoint, "--forward", tmp_path / "bomb.png", "--grid", tmp_path / "f.png")
    one_line_error(r, "bomb.png", "decompression-bomb limit")
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr


class Payload:
    """Unpickling this calls open(marker, 'w'): code a downloaded file would run under plain pickle loading."""
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_malicious_pickle_is_refused_and_runs_nothing(checkpoint, tmp_path):
    marker = tmp_path / "pwned"
    ckpt = load(checkpoint)
    ckpt["config"] = Payload(str(marker))
    torch.save(ckpt, tmp_path / "evil.pt")
    one_line_error(run("sample.py", tmp_path / "evil.pt"), "evil.pt", "not a loadable checkpoint")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "ckpt.pt").write_bytes((tmp_path / "evil.pt").read_bytes())
    one_line_error(run("train.py", "--out", run_dir, "--resume"), "not a loadable checkpoint")
    assert not marker.exists()  # nothing ran
    torch.load(tmp_path / "evil.pt", weights_only=False)  # the payload is live: plain pickle loading runs it
    assert marker.exists()
