"""End to end through train.py and sample.py on tiny data, and the errors users see for bad input."""
import argparse
import errno
import json
import os
import stat
import subprocess
import sys
import time
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import data
import fid
import ddpm
import sample
import train
import unet
from conftest import fid_weights

ROOT = Path(__file__).resolve().parents[1]
FAST_FP32 = ["--sampler", "ddim", "--precision", "fp32"]
TINY = ["--model", "tiny", "--size", "16", "--precision", "fp32", "--batch", "4", "--log-every", "2", "--sample-every", "0", "--sample-n", "8", "--ckpt-every", "3"]


@pytest.fixture
def folder(tmp_path):
    """Twelve small RGB images in two class subfolders, one nested deeper, plus a stray text file."""
    rng = np.random.default_rng(0)
    for i in range(12):
        sub = tmp_path / "imgs" / ("red" if i % 2 else "blue") / ("deep" if i == 3 else "")
        sub.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(sub / f"{i}.png")
    (tmp_path / "imgs" / "notes.txt").write_text("not an image")
    return tmp_path / "imgs"


def run(script, *args, cwd=None):
    return subprocess.run([sys.executable, str(ROOT / script), *map(str, args)], capture_output=True, text=True, cwd=cwd, timeout=300)


def test_tiny_network_overfits_a_fixed_batch():
    torch.manual_seed(0)
    model = unet.UNet(**unet.model_config("tiny", (16, 16), 1))
    d = ddpm.Diffusion()
    x0 = torch.rand(8, 1, 16, 16) * 2 - 1
    t, noise = torch.randint(0, 1000, (8,)), torch.randn(8, 1, 16, 16)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    losses = []
    for _ in range(60):
        loss = d.training_loss(model, x0, t=t, noise=noise)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.2 * losses[0], losses[::10]


def test_train_resume_and_sample_end_to_end(folder, tmp_path, capsys):
    a, b = tmp_path / "a", tmp_path / "b"
    train.main(["--data", str(folder), "--out", str(a), "--steps", "6", *TINY])
    train.main(["--data", str(folder), "--out", str(b), "--steps", "3", *TINY])
    train.main(["--out", str(b), "--resume", "--steps", "6"])
    out = capsys.readouterr().out
    assert "12 images 3x16x16" in out and "resumed" in out

    ca = torch.load(a / "ckpt.pt", weights_only=True)
    cb = torch.load(b / "ckpt.pt", weights_only=True)
    assert ca["step"] == cb["step"] == 6
    for key in ("model", "ema"):  # 3 + resume + 3 steps is the 6-step run, bit for bit on CPU
        for name in ca[key]:
            torch.testing.assert_close(ca[key][name], cb[key][name], rtol=0, atol=1e-6)
    assert ca["config"]["size"] == "16" and "module." not in "".join(ca["model"])

    metrics = [json.loads(line) for line in open(b / "metrics.jsonl")]
    assert [m["step"] for m in metrics] == [2, 3, 4, 6]  # the 3-step run logged its last step
    assert (b / "loss.png").exists() and (b / "config.json").exists()
    assert list((b / "samples").glob("step_*.png"))

    grid = tmp_path / "grid.png"
    sample.main([str(b / "ckpt.pt"), "--n", "5", "--steps", "3", "--grid", str(grid), "--out-dir", str(tmp_path / "png")])
    assert Image.open(grid).size == (5 * 18 + 2, 18 + 2)  # one row of the 5
    assert len(list((tmp_path / "png").glob("*.png"))) == 5

    weights = fid_weights()  # $FID_WEIGHTS or the cache; without them the test is skipped here
    sample.main([str(b / "ckpt.pt"), "--n", "4", "--steps", "2", "--grid", str(grid), "--fid", str(tmp_path / "png"),
                 "--fid-weights", str(weights)])
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.startswith("FID ") and "(n = 4, dpm++ 2 steps" in line and float(line.split()[1]) > 0


def test_the_quality_flags_train_and_a_snapshot_autoguides_the_samples(folder, tmp_path, capsys):
    """--t-density, --norm-groups, --scale-shift, --ema-length and --snapshot in one run: the network and the config
    record them, snapshot.pt holds the weights at the fraction, and sample.py --autoguide steers away from it (from the
    network itself: no change); sample.py's 3M solver on log-SNR steps samples it too."""
    out = tmp_path / "r"
    train.main(["--data", str(folder), "--out", str(out), "--steps", "4", *TINY, "--warmup", "0", "--t-density", "edm",
                "--norm-groups", "8", "--scale-shift", "--ema-length", "0.1", "--snapshot", "0.5"])
    log = capsys.readouterr().out
    assert "ln sigma_t ~ N(-1.2,1.2)" in log and "EMA of length 0.1 (power function)" in log
    assert "GroupNorm of 8 groups, AdaGN," in log and f"step 2 | wrote {out / 'snapshot.pt'} (--snapshot 0.5)" in log
    ckpt, snap = torch.load(out / "ckpt.pt", weights_only=True), torch.load(out / "snapshot.pt", weights_only=True)
    assert ckpt["model_config"]["norm_groups"] == 8 and ckpt["model_config"]["scale_shift"] is True
    assert snap["step"] == 2 and "optimizer" not in snap
    assert {k: ckpt["config"][k] for k in ("t_density", "ema_length", "snapshot")} == \
        {"t_density": "-1.2,1.2", "ema_length": 0.1, "snapshot": 0.5}
    grids = {}
    for name, flags in (("plain", []), ("self", ["--autoguide", str(out / "ckpt.pt"), "--guidance", "5"]),
                        ("snapshot", ["--autoguide", str(out / "snapshot.pt"), "--guidance", "5"]),
                        ("2m", ["--sampler", "dpm++", "--steps", "5"]),  # 3M's own steps: the third and fourth
                        ("3m", ["--sampler", "dpm++", "--steps", "5", "--order", "3", "--spacing", "logsnr"])):
        grid = tmp_path / f"{name}.png"
        sample.main([str(out / "ckpt.pt"), "--n", "4", "--steps", "3", "--grid", str(grid), *FAST_FP32, *flags])
        grids[name] = np.asarray(Image.open(grid), dtype=int)
    assert "autoguidance 5 from" in capsys.readouterr().out
    assert np.abs(grids["self"] - grids["plain"]).max() <= 1  # (1 + w) D - w D: D, up to rounding
    assert np.abs(grids["snapshot"] - grids["plain"]).max() > 10 and np.abs(grids["3m"] - grids["2m"]).max() > 10


def test_power_ema_averages_a_fixed_fraction_of_the_steps_taken():
    """Karras et al. 2024, eq. 3: after t updates with decay (1 - 1/k)^(gamma + 1) at update k, step i's weight in
    the average grows as i^gamma, a profile whose standard deviation is sigma_rel t; --ema's decay warms up as
    min(decay, (1 + n) / (10 + n))."""
    t = 3000
    for sigma_rel in (0.05, 0.1, 0.2):
        weight = np.zeros(t)  # of each step's weights in the average
        for k in range(1, t + 1):
            decay = train.ema_decay(0.999, sigma_rel, k)
            weight *= decay
            weight[k - 1] += 1 - decay
        age = np.arange(1, t + 1) / t
        mean = (weight * age).sum()
        assert weight.sum() == pytest.approx(1) and np.sqrt((weight * (age - mean) ** 2).sum()) == pytest.approx(
            sigma_rel, rel=0.01)
    assert [train.ema_decay(0.995, None, k) for k in (1, 2, 1000, 5000)] == [0.1, 2 / 11, 1000 / 1009, 0.995]


def test_fid_during_training_is_logged_with_its_n(folder, tmp_path, monkeypatch, capsys):
    weights = fid_weights()  # $FID_WEIGHTS or the cache; without them the test is skipped here
    monkeypatch.chdir(folder.parent)  # a relative --fid-ref is stored absolute, as --data is: --resume finds it
    import fid
    read, sizes = fid.read_image, set()
    monkeypatch.setattr(fid, "read_image", lambda path, verify=False, size=None: verify or sizes.add(size) or
                        read(path, verify, size))
    train.main(["--data", str(folder), "--out", str(tmp_path / "r"), "--steps", "4", *TINY,
                "--fid-every", "2", "--fid-ref", folder.name, "--fid-n", "4", "--fid-weights", str(weights)])
    assert json.loads((tmp_path / "r" / "config.json").read_text())["fid_ref"] == str(folder)
    metrics = [json.loads(line) for line in open(tmp_path / "r" / "metrics.jsonl")]
    fids = [m for m in metrics if "fid" in m]
    assert [m["step"] for m in fids] == [2, 4] and all(m["fid_n"] == 4 for m in fids)
    # the reference: a random 4 of the 12 (not the first 4 names: one class), read at --size as the data is
    which = "a uniform random 4 of its 12 images (seed 0), read at 16x16"
    assert sizes == {(16, 16)} and all(m["fid_ref"] == f"{folder}: {which}" for m in fids)
    out = capsys.readouterr().out
    assert f"FID every 2 steps: 4 EMA samples against {folder}, {which}" in out and "biased upward" in out
    assert all(np.isfinite(m["fid"]) and m["fid"] > 0 for m in fids) and fids[0]["fid_sampler"] == "dpm++ 20 steps"
    assert [m["step"] for m in metrics if "loss" in m] == [2, 4]
    assert (tmp_path / "r" / "loss.png").exists()


def test_fid_flags_are_checked_before_training(folder, tmp_path):
    one_line_error(run("train.py", "--data", folder, "--out", tmp_path / "r", "--fid-every", "5", *TINY), "--fid-ref")
    one_line_error(run("train.py", "--data", folder, "--out", tmp_path / "r", "--fid-every", "5", *TINY,
                       "--fid-ref", tmp_path / "missing", "--fid-n", "4"), "missing", "no such folder")
    one_line_error(run("train.py", "--data", folder, "--out", tmp_path / "r", "--fid-every", "5", *TINY,
                       "--fid-ref", folder, "--fid-n", "100", "--fid-weights", tmp_path / "none.pth"),
                   "--fid-weights", "none.pth")


def test_fid_errors_name_the_scripts_own_flags(folder, tmp_path, capsys):
    odd = tmp_path / "x--n"  # a path holding a flag's name is not renamed
    odd.mkdir()
    for p in list(folder.rglob("*.png"))[:3]:
        (odd / p.name).write_bytes(p.read_bytes())
    with pytest.raises(ValueError, match=f"^--fid-ref: {odd}: 3 image files, .* lower --fid-n$"):  # train.py's --fid-n
        fid.meter(str(odd), 100, fid_weights(), "cpu", None, "--fid-ref", {"--n": "--fid-n"})
    with pytest.raises(ValueError, match="lower --n$"):  # and sample.py's --n
        fid.meter(str(folder), 100, fid_weights(), "cpu", None, "--fid")
    with pytest.raises(ValueError, match=f"^--fid: --fid-weights {tmp_path}/a --weights b: no such file"):
        fid.meter(str(folder), 4, str(tmp_path / "a --weights b"), "cpu", None, "--fid")


def test_an_fid_that_cannot_be_computed_ends_sampling_in_one_line_and_training_goes_on(folder, tmp_path, monkeypatch,
                                                                                        capsys):
    import fid

    def no_root(*args, **kwargs):
        raise fid.FIDError("the covariance product has no real square root (imaginary part 0.1); use more images")
    monkeypatch.setattr(fid, "fid_from_samples", no_root)
    fids = ["--fid-every", "2", "--fid-ref", str(folder), "--fid-n", "4", "--fid-weights", str(fid_weights())]
    train.main(["--data", str(folder), "--out", str(tmp_path / "r"), "--steps", "2", *TINY, *fids])
    assert "step 2 | no FID: --fid-ref/--fid-weights: the covariance product" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        sample.main([str(tmp_path / "r" / "ckpt.pt"), "--n", "4", "--sampler", "ddim", "--steps", "2", "--fid",
                     str(folder), "--fid-weights", str(fid_weights()), "--grid", str(tmp_path / "g.png")])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and err[-1] == ("sample.py: error: --fid: the covariance product has no real square "
                                             "root (imaginary part 0.1); use more images")
    assert (tmp_path / "g.png").exists()  # the samples were kept


def test_captions_of_small_images_do_not_overlap():
    torch.manual_seed(0)
    model, d = unet.UNet(**unet.model_config("tiny", (8, 8), 1)).eval(), ddpm.Diffusion()
    strip, frames = sample.draw_picture("process", model, d, (1, 8, 8), 1, dict(sampler="ddim", steps=3))
    cell = 8 * 4  # "t=999" is wider than 8 pixels twice
    height = 12 + 2 * (cell + 2) + 2
    assert strip.size == (3 * (cell + 2) + 2, height) and {f.size for f in frames} == {(cell + 4, height)}
    image = torch.zeros(1, 1, 8, 8)
    forward = sample.draw_picture("forward", model, d, (1, 8, 8), 1, {}, images=[image], ts=[0, 5])
    assert forward.size[0] == 2 * (8 * 3 + 2) + 2  # "t=5" needs three times


def test_the_process_shows_x_t_and_the_x0_predicted_from_it():
    torch.manual_seed(0)
    model, d = unet.UNet(**unet.model_config("tiny", (16, 16), 1)).eval(), ddpm.Diffusion()
    loop = dict(sampler="ddim", steps=3)
    strip, frames = sample.draw_picture("process", model, d, (1, 16, 16), 1, loop, seed=5)
    x_T = torch.randn((1, 1, 16, 16), generator=torch.Generator().manual_seed(5))
    final = d.sample(model, (1, 1, 16, 16), generator=torch.Generator().manual_seed(5), **loop)
    assert len(frames) == 3 and strip.size == (3 * 34 + 2, 12 + 2 * 34 + 2)
    cell = lambda frame, row: np.asarray(frame)[14 + 34 * row:46 + 34 * row:2, 2:34:2]  # scale 2, 2 px apart
    assert (cell(frames[0], 0) == data.to_uint8(x_T)[0, ..., 0]).all()  # t=999: x_T itself
    assert (cell(frames[-1], 1) == data.to_uint8(final)[0, ..., 0]).all()  # the last x_0 predicted: the sample


def test_config_file_repeats_a_run_and_flags_override_it(folder, tmp_path):
    train.main(["--data", str(folder), "--out", str(tmp_path / "a"), "--steps", "2", "--lr", "5e-4", *TINY])
    train.main(["--config", str(tmp_path / "a" / "config.json"), "--out", str(tmp_path / "b"), "--steps", "3"])
    cfg = json.loads((tmp_path / "b" / "config.json").read_text())
    assert cfg["lr"] == 5e-4 and cfg["steps"] == 3 and cfg["model"] == "tiny"


def test_grey_folder_trains_a_one_channel_model(tmp_path):
    for i in range(4):
        (tmp_path / "grey").mkdir(exist_ok=True)
        Image.fromarray(np.full((16, 16), 40 * i, np.uint8)).save(tmp_path / "grey" / f"{i}.png")
    train.main(["--data", str(tmp_path / "grey"), "--out", str(tmp_path / "run"), "--steps", "1", *TINY])
    assert torch.load(tmp_path / "run" / "ckpt.pt", weights_only=True)["model_config"]["in_ch"] == 1


def test_corrupt_image_is_skipped_with_a_count(folder, tmp_path):
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    r = run("train.py", "--data", folder, "--out", tmp_path / "run", "--steps", "1", *TINY)
    assert r.returncode == 0, r.stderr
    assert "skipped 1 unreadable image file(s)" in r.stdout and "12 images" in r.stdout


def one_line_error(r, *words):
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    assert "Traceback" not in r.stderr
    line = r.stderr.strip().splitlines()[-1]
    for w in words:
        assert w in line, line


def test_bad_input_gives_one_line_errors(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    one_line_error(run("train.py", "--data", empty, "--out", tmp_path / "r"), "no images found", str(empty))
    (empty / "a.txt").write_text("x")
    one_line_error(run("train.py", "--data", empty, "--out", tmp_path / "r"), "no images found")
    one_line_error(run("train.py", "--data", tmp_path / "missing", "--out", tmp_path / "r"), "no such folder")
    one_line_error(run("train.py", "--data", "shapes", "--size", "28", "--out", tmp_path / "r"), "--size", "24 or 32")
    one_line_error(run("sample.py", tmp_path / "nope.pt"), "no such checkpoint")
    (tmp_path / "fake.pt").write_bytes(b"this is not a checkpoint")
    one_line_error(run("sample.py", tmp_path / "fake.pt"), "not a loadable checkpoint")
    torch.save({"weights": torch.zeros(1)}, tmp_path / "other.pt")
    one_line_error(run("sample.py", tmp_path / "other.pt"), "not a train.py checkpoint")
    one_line_error(run("train.py", "--out", tmp_path / "none", "--resume"), "no such checkpoint")


def test_unreadable_images_only(tmp_path):
    (tmp_path / "a.png").write_bytes(b"")
    (tmp_path / "b.png").write_bytes(b"\x89PNG garbage")
    one_line_error(run("train.py", "--data", tmp_path, "--out", tmp_path.parent / f"{tmp_path.name}-r"), "none of the 2 image files")


def test_a_class_folder_with_no_readable_image_is_refused(tmp_path):
    for name in ("good", "bad"):
        (tmp_path / "d" / name).mkdir(parents=True)
    Image.new("RGB", (16, 16), "red").save(tmp_path / "d" / "good" / "1.png")
    (tmp_path / "d" / "bad" / "1.png").write_bytes(b"\x89PNG garbage")
    one_line_error(run("train.py", "--data", tmp_path / "d", "--cond", "--out", tmp_path / "r"),
                   "none of the images of class folder(s) bad", "remove the folder(s)")


def test_conditional_run_samples_a_class_with_guidance_and_a_row_per_class(folder, tmp_path, capsys):
    train.main(["--data", str(folder), "--out", str(tmp_path / "c"), "--steps", "2", "--cond", *TINY])
    ckpt = tmp_path / "c" / "ckpt.pt"
    assert torch.load(ckpt, weights_only=True)["classes"] == ["blue", "red"]
    fast = ["--sampler", "ddim", "--steps", "2", "--nrow", "3"]
    sample.main([str(ckpt), "--grid", str(tmp_path / "rows.png"), *fast])  # no --class: a row of 3 per class
    assert Image.open(tmp_path / "rows.png").size == (3 * 18 + 2, 2 * 18 + 2)
    sample.main([str(ckpt), "--class", "red", "--guidance", "3", "--n", "2", "--grid", str(tmp_path / "red.png"), *fast])
    assert "class red, guidance 3" in capsys.readouterr().out
    c = torch.load(ckpt, weights_only=True)
    assert sample.class_labels(c, "red", 3, 2).tolist() == [1, 1] == sample.class_labels(c, "1", 0, 2).tolist() \
        == sample.class_labels(c, 1, 0, 2).tolist()  # an index as a number too
    assert sample.class_labels(c, None, 0, None).tolist() == [0] * 8 + [1] * 8
    one_line_error(run("sample.py", ckpt, "--class", "green", *fast), "--class green", "blue, red")
    train.main(["--data", str(folder), "--out", str(tmp_path / "u"), "--steps", "1", *TINY])
    one_line_error(run("sample.py", tmp_path / "u" / "ckpt.pt", "--guidance", "3", *fast), "--guidance", "unconditional")


def test_cond_needs_class_subfolders(tmp_path):
    flat = tmp_path / "flat"
    flat.mkdir()
    for i in range(3):
        Image.fromarray(np.full((16, 16, 3), 40 * i, np.uint8)).save(flat / f"{i}.png")
    one_line_error(run("train.py", "--data", flat, "--out", tmp_path / "r", "--cond", *TINY), "--cond", "two class subfolders")


def test_pictures_of_the_process_from_the_command_line(folder, tmp_path, capsys):
    train.main(["--data", str(folder), "--out", str(tmp_path / "r"), "--steps", "1", *TINY])
    ckpt, img = str(tmp_path / "r" / "ckpt.pt"), str(next(folder.rglob("*.png")))
    mask = tmp_path / "mask.png"
    Image.fromarray(np.pad(np.full((8, 8), 255, np.uint8), 4)).save(mask)
    fast = ["--sampler", "ddim", "--steps", "3"]
    sample.main([ckpt, "--process", str(tmp_path / "p.gif"), "--n", "2", *fast])
    gif = Image.open(tmp_path / "p.gif")
    assert gif.n_frames == 3 and gif.size == (2 * 34 + 2, 12 + 2 * 34 + 2)  # a frame per step; x_t over x_0
    sample.main([ckpt, "--process", str(tmp_path / "p.png"), "--n", "2", *fast])
    assert Image.open(tmp_path / "p.png").size == (3 * 34 + 2, 12 + 4 * 34 + 2)  # the 3 steps (10 at most); 2 rows each
    sample.main([ckpt, "--forward", img, "--t", "0", "500", "999", "--grid", str(tmp_path / "f.png")])
    assert Image.open(tmp_path / "f.png").size == (3 * 34 + 2, 12 + 34 + 2)
    sample.main([ckpt, "--mix", img, img, "--t", "5", "10", "--grid", str(tmp_path / "m.png")])
    assert Image.open(tmp_path / "m.png").size == (5 * 34 + 2, 12 + 34 + 2)  # a, b, blend, 2 mixes
    sample.main([ckpt, "--interp", "5", "--n", "2", "--grid", str(tmp_path / "i.png"), *fast])
    assert Image.open(tmp_path / "i.png").size == (5 * 34 + 2, 12 + 2 * 34 + 2)
    assert "wrote" in capsys.readouterr().out
    one_line_error(run("sample.py", ckpt, "--inpaint", img), "--mask")
    one_line_error(run("sample.py", ckpt, "--interp", "5", "--sampler", "ddpm"), "--interp", "deterministic")
    one_line_error(run("sample.py", ckpt, "--forward", tmp_path / "none.png"), "none.png")
    one_line_error(run("sample.py", ckpt, "--mix", img, img, "--t", "1000"), "--t")
    one_line_error(run("sample.py", ckpt, "--process", tmp_path / "p.jpg"), "--process", ".gif")


def test_a_checkpoint_with_fewer_than_20_steps_samples_and_draws_with_the_defaults(folder, tmp_path):
    train.main(["--data", str(folder), "--out", str(tmp_path / "r"), "--steps", "1", *TINY, "--T", "10"])
    ckpt, img = str(tmp_path / "r" / "ckpt.pt"), str(next(folder.rglob("*.png")))
    sample.main([ckpt, "--n", "2", "--grid", str(tmp_path / "g.png")])  # dpm++ on all 10 steps, not 20
    sample.main([ckpt, "--process", str(tmp_path / "p.png"), "--n", "1"])
    assert Image.open(tmp_path / "p.png").size == (10 * 34 + 2, 12 + 2 * 34 + 2)
    sample.main([ckpt, "--forward", img, "--grid", str(tmp_path / "f.png")])  # t = 0 1 2 5 8 9: the defaults, scaled
    assert Image.open(tmp_path / "f.png").size == (6 * 34 + 2, 12 + 34 + 2)
    sample.main([ckpt, "--mix", img, img, "--grid", str(tmp_path / "m.png")])  # a, b, blend, t = 1 2 4 6 7 8
    assert Image.open(tmp_path / "m.png").size == (9 * 34 + 2, 12 + 34 + 2)


def test_sample_files_are_readable_written_through_links_and_their_leftovers_replaced(folder, tmp_path, monkeypatch):
    train.main(["--data", str(folder), "--out", str(tmp_path / "r"), "--steps", "1", *TINY])
    ckpt, out, real, link = str(tmp_path / "r" / "ckpt.pt"), tmp_path / "gen", tmp_path / "real.png", tmp_path / "link.png"
    out.mkdir()
    (out / "000000.png.1234abcd.tmp").write_bytes(b"what a killed write left")
    real.write_bytes(b"")
    link.symlink_to(real)
    monkeypatch.setattr(os, "fsync", lambda fd: (_ for _ in ()).throw(OSError(errno.EINVAL, "Invalid argument")))
    umask = os.umask(0o022)  # a file system without fsync, and the usual umask
    try:
        sample.main([ckpt, "--n", "2", "--steps", "2", "--grid", str(link), "--out-dir", str(out), "--replace"])
    finally:
        os.umask(umask)
    assert sorted(os.listdir(out)) == ["000000.png", "000001.png"]
    assert link.is_symlink() and Image.open(real).size == (2 * 18 + 2, 18 + 2)  # the grid went through the link
    assert {stat.S_IMODE(p.stat().st_mode) for p in (real, *out.iterdir())} == {0o644}  # not mkstemp's 0600


def test_a_failed_write_leaves_no_broken_png_and_names_the_file(folder, tmp_path, monkeypatch):
    train.main(["--data", str(folder), "--out", str(tmp_path / "r"), "--steps", "1", *TINY])
    ckpt, grid, out = str(tmp_path / "r" / "ckpt.pt"), tmp_path / "grid.png", tmp_path / "gen"
    sample.main([ckpt, "--n", "2", "--steps", "2", "--grid", str(grid)])
    before, save, saves = grid.read_bytes(), Image.Image.save, []

    def disk_full_at_the_third(image, f, **kw):  # half a file, then no space: as a full disk does
        saves.append(1)
        if len(saves) == 3:
            f.write(b"\x89PNG half")
            raise OSError(28, "No space left on device")
        return save(image, f, **kw)
    monkeypatch.setattr(Image.Image, "save", disk_full_at_the_third)
    with pytest.raises(OSError) as e:
        sample.main([ckpt, "--n", "4", "--steps", "2", "--grid", str(grid), "--out-dir", str(out)])
    assert e.value.filename == str(out / "000002.png") and e.value.strerror == "No space left on device"
    assert sorted(os.listdir(out)) == ["000000.png", "000001.png"]  # no broken third, no temporary file
    saves.clear()
    saves.append(1)
    saves.append(1)
    with pytest.raises(OSError):
        sample.main([ckpt, "--n", "2", "--steps", "2", "--grid", str(grid)])
    assert grid.read_bytes() == before  # the old grid is whole


def test_samples_are_the_same_for_any_batch_size_and_number_of_processes(folder, tmp_path):
    # sample i's x_T and sampler noise are a function of (seed, i): ddim with eta 1 draws noise at every step
    train.main(["--data", str(folder), "--out", str(tmp_path / "r"), "--steps", "1", *TINY])
    ckpt, common = tmp_path / "r" / "ckpt.pt", ["--sampler", "ddim", "--eta", "1", "--steps", "3", "--seed", "7"]
    for name, batch in (("one_b2", 2), ("one_b5", 5)):
        sample.main([str(ckpt), "--num-samples", "7", "--batch-size", str(batch), "--out-dir", str(tmp_path / name),
                     "--grid", str(tmp_path / f"{name}.png"), *common])
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", str(ROOT / "sample.py"),
                        str(ckpt), "--num-samples", "7", "--batch-size", "3", "--out-dir", str(tmp_path / "two"),
                        "--grid", str(tmp_path / "two.png"), *common], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    names = [f"{i:06d}.png" for i in range(7)]
    for name in ("one_b5", "two"):
        assert sorted(p.name for p in (tmp_path / name).iterdir()) == names
        for f in names:
            assert (tmp_path / name / f).read_bytes() == (tmp_path / "one_b2" / f).read_bytes(), (name, f)
    assert (tmp_path / "two.png").read_bytes() == (tmp_path / "one_b2.png").read_bytes()
    sample.main([str(ckpt), "--num-samples", "7", "--out-dir", str(tmp_path / "seed8"), "--grid",
                 str(tmp_path / "seed8.png"), *common[:-1], "8"])  # another --seed: other images, every one
    assert all((tmp_path / "seed8" / f).read_bytes() != (tmp_path / "one_b2" / f).read_bytes() for f in names)
    assert [sample.sample_seed(0, i) for i in range(3)] == [0, 1, 2]  # seed 0's samples are what they were


def test_a_time_budget_fixes_the_step_count_and_trains_as_that_many_steps_would(folder, tmp_path, capsys):
    started = time.time()
    train.main(["--data", str(folder), "--out", str(tmp_path / "timed"), "--time", "15s", *TINY])
    seconds = time.time() - started
    log = capsys.readouterr().out
    planned = json.loads((tmp_path / "timed" / "config.json").read_text())["steps"]
    timed = torch.load(tmp_path / "timed" / "ckpt.pt", weights_only=True)
    assert f"--steps {planned} (recorded in config.json" in log and timed["step"] == timed["config"]["steps"] == planned
    assert planned > 4 and seconds < 30  # steps after the timed ones; inside the budget, give or take a busy machine
    # the timed run is the fixed run of its planned length, bit for bit: the plan was made before the warm-up ended
    train.main(["--data", str(folder), "--out", str(tmp_path / "fixed"), "--steps", str(planned), *TINY])
    fixed = torch.load(tmp_path / "fixed" / "ckpt.pt", weights_only=True)
    for name in fixed["ema"]:
        torch.testing.assert_close(timed["ema"][name], fixed["ema"][name], rtol=0, atol=0)


def test_a_step_too_big_for_memory_accumulates_or_is_refused(folder, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(train, "step_memory", lambda run: (0.0, 1e6))  # 1 MB an image
    monkeypatch.setattr(train, "available_memory", lambda device: 10e6)  # 90% of it: 9 images a micro-batch
    train.main(["--data", str(folder), "--out", str(tmp_path / "r"), "--steps", "2", *TINY, "--batch", "32"])
    out = capsys.readouterr().out
    assert "--accum 4 instead of 1 (the batch stays 32)" in out
    assert "memory about 0.00745 of 0.00931 GB free" in out  # 3 significant digits: a tiny step is not "0.0"
    assert json.loads((tmp_path / "r" / "config.json").read_text())["accum"] == 4
    monkeypatch.setattr(train, "available_memory", lambda device: 1e6)
    with pytest.raises(SystemExit) as e:
        train.main(["--data", str(folder), "--out", str(tmp_path / "s"), "--steps", "2", *TINY])
    err = capsys.readouterr().err
    assert e.value.code == 2 and len(err.strip().splitlines()) == 1 and "--model (tiny, small) or --size" in err


def test_the_memory_estimate_grows_with_the_pixels_and_covers_the_optimizer():
    def estimate(side):
        model = unet.UNet(**unet.model_config("tiny", (side, side), 3))
        run = argparse.Namespace(args=argparse.Namespace(channels=3, cond=False), size=(side, side), model=model,
                                 device=torch.device("cpu"), autocast=torch.autocast("cpu", enabled=False),
                                 diffusion=ddpm.Diffusion("cosine", 1000, "v"))
        return train.step_memory(run), sum(p.numel() * 4 for p in model.parameters())
    (fixed16, per16), weights = estimate(16)
    (fixed32, per32), _ = estimate(32)
    assert 3 < per32 / per16 < 4.5 and fixed16 >= 3 * weights  # activations scale with H x W


def test_a_grid_of_fewer_images_than_a_row_is_one_row_of_them_and_of_none_an_error():
    assert data.grid_image(torch.zeros(3, 1, 4, 4), nrow=8).size == (3 * (4 + 2) + 2, 4 + 2 + 2)
    for n, nrow in ((0, 8), (3, 0)):
        with pytest.raises(ValueError, match=f"a grid of {n} images, {nrow} a row"):
            data.grid_image(torch.zeros(n, 1, 4, 4), nrow)


def test_a_cpu_run_of_more_than_a_day_says_so_and_names_the_cpu_presets(capsys):
    run = argparse.Namespace(device=torch.device("cpu"), args=argparse.Namespace(steps=1_000_000, model="paper"))
    train.warn_if_slow(run, 1, 0.5)
    out = capsys.readouterr().out
    assert "about 5.8 days on this CPU" in out and "--model tiny or small" in out
    run.args.model = "tiny"  # already a CPU preset: the step count is what to change
    train.warn_if_slow(run, 1, 0.5)
    out = capsys.readouterr().out
    assert "about 5.8 days on this CPU" in out and "give fewer --steps" in out and "--model" not in out


@pytest.mark.parametrize("slow", ["bf16", "fp32"])
def test_auto_precision_picks_the_faster_side_and_keeps_the_thread_count(monkeypatch, slow):
    class Conv(torch.nn.Conv2d):  # one side 0.1 s slower than the other, whatever this CPU's ISA
        def forward(self, x):
            if torch.is_autocast_enabled("cpu") == (slow == "bf16"):
                time.sleep(0.1)
            return super().forward(x)
    monkeypatch.setattr(torch.nn, "Conv2d", Conv)
    threads = torch.get_num_threads()
    assert data.fastest_precision("cpu") == ("fp32" if slow == "bf16" else "bf16")
    assert torch.get_num_threads() == threads


@pytest.mark.parametrize("pixels", [np.full((8, 8), 0.5, np.float32), np.full((8, 8), 200, np.int32)])
def test_a_32_bit_image_is_refused_not_read_as_black(tmp_path, pixels):
    Image.fromarray(pixels).save(tmp_path / "f.tif")
    with pytest.raises(ValueError, match="32-bit pixels"):
        data.read_image(str(tmp_path / "f.tif"), (8, 8))


def test_a_config_chooses_again_what_the_run_chose_itself(folder, tmp_path):
    grey = tmp_path / "grey"
    grey.mkdir()
    for i in range(4):
        Image.fromarray(np.full((16, 16), 60 * i, np.uint8)).save(grey / f"{i}.png")
    tiny = [w for w in TINY if w not in ("--precision", "fp32")]
    train.main(["--data", str(grey), "--out", str(tmp_path / "a"), "--steps", "1", *tiny])
    cfg = json.loads((tmp_path / "a" / "config.json").read_text())
    assert cfg["channels"] == 1 and cfg["precision"] in ("bf16", "fp32") and cfg["auto"] == ["channels", "precision"]
    train.main(["--config", str(tmp_path / "a" / "config.json"), "--data", str(folder), "--out", str(tmp_path / "b")])
    ckpt = torch.load(tmp_path / "b" / "ckpt.pt", weights_only=True)
    assert ckpt["model_config"]["in_ch"] == 3 and ckpt["config"]["auto"] == ["channels", "precision"]
    train.main(["--config", str(tmp_path / "a" / "config.json"), "--channels", "1", "--data", str(folder),
                "--out", str(tmp_path / "c")])  # given, it is not chosen again
    assert json.loads((tmp_path / "c" / "config.json").read_text())["auto"] == ["precision"]
    train.main(["--out", str(tmp_path / "c"), "--resume", "--steps", "2"])
    assert torch.load(tmp_path / "c" / "ckpt.pt", weights_only=True)["config"]["auto"] == ["precision"]
    train.main(["--out", str(tmp_path / "c"), "--resume", "--steps", "3", "--precision", "fp32"])  # given: not chosen
    assert json.loads((tmp_path / "c" / "config.json").read_text())["auto"] == []


def test_a_resume_names_what_the_flags_changed_and_the_learning_rate_they_give(folder, tmp_path, capsys):
    train.main(["--data", str(folder), "--out", str(tmp_path / "r"), "--steps", "2", "--lr", "1e-3", *TINY])
    capsys.readouterr()
    Image.new("RGB", (16, 16)).save(folder / "added.png")
    train.main(["--out", str(tmp_path / "r"), "--resume", "--steps", "3", "--lr", "3e-3", "--seed", "5"])
    out = capsys.readouterr().out
    assert f"--data {folder}: 13 images where the checkpoint's run had 12" in out, out
    cfg = torch.load(tmp_path / "r" / "ckpt.pt", weights_only=True)["config"]
    before, now = (train.learning_rate(argparse.Namespace(**c), 2) for c in ({**cfg, "lr": 1e-3, "steps": 2}, cfg))
    assert "--steps 2 -> 3, --lr 0.001 -> 0.003, --seed 0 -> 5" in out, out
    assert f"re-planned from these settings: {before:.6g} -> {now:.6g} at step 3" in out and before < now, out
    train.main(["--out", str(tmp_path / "r"), "--resume", "--steps", "4", "--lr", "3.0000001e-3"])
    assert "re-planned" not in capsys.readouterr().out  # a change too small to show is no change to report


@pytest.mark.parametrize("error, words", [
    ("[enforce fail at alloc_cpu.cpp:127] DefaultCPUAllocator: can't allocate memory: you tried to allocate 1 bytes",
     ["out of memory on cpu at step 1", "--accum 2"]),
    ("InvalidCxxCompiler: No working C++ compiler found\n\nSet TORCHDYNAMO_VERBOSE=1", ["--compile", "C++ compiler",
                                                                                       "without --compile"]),
])
def test_a_first_step_the_user_can_fix_is_one_line(folder, tmp_path, monkeypatch, capsys, error, words):
    def fails(*args):
        raise RuntimeError(error)
    monkeypatch.setattr(train, "train_step", fails)
    with pytest.raises(SystemExit) as e:
        train.main(["--data", str(folder), "--out", str(tmp_path / "r"), "--steps", "2", *TINY, "--compile"])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1 and all(w in err for w in words), err
    assert not (tmp_path / "r").exists()  # a start that made no step leaves nothing: no .lock, no samples/


def test_a_memory_probe_that_runs_out_of_memory_is_one_line(folder, tmp_path, monkeypatch, capsys):
    def fails(run):
        raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 1 bytes")
    monkeypatch.setattr(train, "step_memory", fails)
    with pytest.raises(SystemExit) as e:
        train.main(["--data", str(folder), "--out", str(tmp_path / "r"), "--steps", "2", *TINY])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1 and "even a probe of one image runs out of memory" in err


def test_compile_without_a_cpp_compiler_is_one_line(folder, tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "train.py"), "--data", str(folder), "--out", str(tmp_path / "r"),
                        "--steps", "1", *TINY, "--compile"], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "CXX": str(tmp_path / "no-compiler")})
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert r.stderr.strip().splitlines()[-1].startswith("train.py: error: --compile: torch.compile failed"), r.stderr


def write_tree(root, files):
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)


@pytest.mark.parametrize("cgroup, files, gb", [
    ("4:memory:/job/step\n0::/\n", {"sys/fs/cgroup/memory/job/memory.limit_in_bytes": str(3 << 30),
                                      "sys/fs/cgroup/memory/job/memory.usage_in_bytes": str(1 << 30),
                                      "sys/fs/cgroup/memory/job/step/memory.limit_in_bytes": str(1 << 62),
                                      "sys/fs/cgroup/memory/job/step/memory.usage_in_bytes": str(1 << 30)}, 2),
    ("0::/a/b\n", {"sys/fs/cgroup/a/memory.max": "max\n", "sys/fs/cgroup/a/memory.current": "5",
                   "sys/fs/cgroup/a/b/memory.max": str(5 << 30), "sys/fs/cgroup/a/b/memory.current": str(1 << 30)}, 4),
    ("0::/docker/abc\n", {"sys/fs/cgroup/memory.max": str(6 << 30), "sys/fs/cgroup/memory.current": "0"}, 6),
    ("garbage\n0:://a/\n", {"sys/fs/cgroup/a/memory.max": str(5 << 30), "sys/fs/cgroup/a/memory.current": str(3 << 30),
                             "sys/fs/cgroup/a/memory.stat": f"anon 5\ninactive_file {1 << 30}\nactive_file 9\n"}, 3),
    ("0::/\n", {}, 8),
])
def test_available_memory_is_capped_by_every_cgroup_above_the_process(tmp_path, cgroup, files, gb):
    write_tree(tmp_path, {"proc/meminfo": f"MemTotal: 99 kB\nMemAvailable: {8 << 20} kB\n", "proc/self/cgroup": cgroup,
                          **files})
    assert train.available_memory(torch.device("cpu"), root=str(tmp_path)) == gb << 30


def test_a_class_folder_with_no_readable_image_is_refused_and_one_without_images_named(tmp_path, capsys):
    for c in ("cats", "dogs"):
        (tmp_path / "data" / c).mkdir(parents=True)
        Image.new("RGB", (16, 16), (9, 9, 9)).save(tmp_path / "data" / c / "0.png")
    (tmp_path / "data" / "kittens").symlink_to(tmp_path / "data" / "cats")
    (tmp_path / "data" / "a_link").symlink_to(tmp_path / "data" / "dogs")  # before dogs in sorted order
    (tmp_path / "data" / "cats" / "x").symlink_to(tmp_path / "data" / "dogs")  # walked before dogs itself
    (tmp_path / "data" / "empty").mkdir()
    train.main(["--data", str(tmp_path / "data"), "--out", str(tmp_path / "a"), "--cond", "--steps", "1", *TINY])
    assert "--cond: a_link, empty, kittens in" in capsys.readouterr().out
    assert torch.load(tmp_path / "a" / "ckpt.pt", weights_only=True)["classes"] == ["cats", "dogs"]
    assert data.find_images(str(tmp_path / "data")) == [str(tmp_path / "data" / c / "0.png") for c in ("cats", "dogs")]
    (tmp_path / "data" / "dogs" / "0.png").write_bytes(b"not a png")
    with pytest.raises(SystemExit) as e:
        train.main(["--data", str(tmp_path / "data"), "--out", str(tmp_path / "b"), "--cond", "--steps", "1", *TINY])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "class folder(s) dogs" in err and not (tmp_path / "b" / "ckpt.pt").exists()


def test_a_mask_is_matched_to_the_photo_as_it_is_shown(tmp_path):
    photo, exif = tmp_path / "photo.png", Image.Exif()
    exif[0x0112] = 6  # stored 24 wide and 16 high; shown turned upright, 16 wide and 24 high
    Image.new("RGB", (24, 16), "red").save(photo, exif=exif)
    shown, stored = tmp_path / "shown.png", tmp_path / "stored.png"
    Image.fromarray(np.pad(np.full((12, 16), 255, np.uint8), ((0, 12), (0, 0)))).save(shown)  # its top half
    Image.new("L", (24, 16), 255).save(stored)
    hole = sample.load_mask(str(shown), (24, 16), str(photo))
    assert hole[0, 0, :12].all() and not hole[0, 0, 12:].any()
    with pytest.raises(ValueError, match="stored.png is 24x16 but .*photo.png is 16x24"):
        sample.load_mask(str(stored), (24, 16), str(photo))


def test_class_indices_are_plain_numbers():
    ckpt = {"classes": ["a", "b", "c", "d"], "model_config": {"num_classes": 4}}
    assert sample.class_labels(ckpt, "3", 0.0, 2).tolist() == [3, 3]
    for cls in ("03", "\u0663", "+3", "4"):
        with pytest.raises(ValueError, match="not a class"):
            sample.class_labels(ckpt, cls, 0.0, 2)
    numbered = {"classes": ["0", "1", "2", "3", "5"], "model_config": {"num_classes": 5}}  # folder 4 missing
    assert sample.class_labels(numbered, "5", 0.0, 1).tolist() == [4]  # a name, never the index
    with pytest.raises(ValueError, match="--class 4: not a class of this checkpoint; choose one of 0, 1, 2, 3, 5"):
        sample.class_labels(numbered, "4", 0.0, 1)  # not index 4, folder 5


def test_the_network_flags_build_the_network_over_the_preset_and_are_recorded(folder, tmp_path, capsys):
    flags = ["--ch", "64", "--ch-mult", "1,2", "--num-res-blocks", "2", "--dropout", "0.1", "--attn-res", "none"]
    train.main(["--data", str(folder), "--out", str(tmp_path / "a"), "--steps", "1", *TINY, *flags])
    expected = unet.model_config("tiny", (16, 16), 3, ch=64, ch_mult=(1, 2), num_res_blocks=2, dropout=0.1, attn_res=())
    assert torch.load(tmp_path / "a" / "ckpt.pt", weights_only=True)["model_config"] == expected
    model = unet.UNet(**expected)
    millions = sum(p.numel() for p in model.parameters()) / 1e6
    assert f"tiny network, {millions:.2f}M parameters, GroupNorm of 8 groups, AdaGN, attention at the middle |" in \
        capsys.readouterr().out
    assert model.attn_sizes == [] and millions > 2  # tiny's own network has 0.5M
    cfg = json.loads((tmp_path / "a" / "config.json").read_text())
    assert [cfg[k] for k in unet.NETWORK_KEYS] == [64, "1,2", 2, 0.1, "none", 8, True]
    train.main(["--config", str(tmp_path / "a" / "config.json"), "--out", str(tmp_path / "b"), "--steps", "1"])
    assert torch.load(tmp_path / "b" / "ckpt.pt", weights_only=True)["model_config"] == expected  # repeated
    train.main(["--out", str(tmp_path / "a"), "--resume", "--steps", "2", "--ch-mult", "1, 2"])  # the same: no change


def test_the_network_keywords_of_model_config_and_the_flags_defaults_are_the_presets():
    assert unet.model_config("tiny", (32, 32), 3, ch=64) == dict(unet.model_config("tiny", (32, 32), 3), ch=64)
    assert unet.model_config("paper", (32, 32), 3) == dict(ch=128, ch_mult=(1, 2, 2, 2), num_res_blocks=2, dropout=0.1,
                                                          norm_groups=32, scale_shift=False, in_ch=3,
                                                          image_size=(32, 32),
                                                          num_classes=0)  # the paper's
    assert unet.UNet(**unet.model_config("paper", (32, 32), 3, ch=32, attn_res=(16, 8))).attn_sizes == [(16, 16), (8, 8)]
    with pytest.raises(TypeError, match="unknown network setting.*dim"):
        unet.model_config("tiny", (32, 32), 3, dim=64)  # lucidrains' name
    for argv, network in [(["--size", "32"], [128, "1,2,2,2", 2, 0.1, "16", 32, False]),
                          (["--size", "24", "--model", "tiny"], [32, "1,2,2", 1, 0.0, "12", 8, True]),
                          (["--size", "32", "--attn-res", "8,16", "--ch", "32"], [32, "1,2,2,2", 2, 0.1, "16,8", 32, False]),
                          (["--size", "24", "--model", "tiny", "--no-scale-shift"], [32, "1,2,2", 1, 0.0, "12", 8, False])]:
        args, *_ = train.parse_args(argv)
        assert [getattr(args, k) for k in unet.NETWORK_KEYS] == network, argv


def test_the_second_line_names_the_recipe_and_marks_what_the_preset_chose(folder, tmp_path, capsys):
    train.main(["--data", str(folder), "--out", str(tmp_path / "r"), "--steps", "2", *TINY, "--loss", "l1",
                "--warmup", "1"])
    out = capsys.readouterr().out.splitlines()
    assert out[out.index(next(line for line in out if "M parameters" in line)) + 1] == (
        "v target (tiny preset), cosine schedule (tiny preset), l1 loss, ln sigma_t ~ N(0,1.2) (tiny preset), T 1000 "
        "| lr 0.002 (tiny preset) after 1 warm-up steps, then cosine to 0 (tiny preset) | EMA 0.995 (tiny preset) | "
        "batch 4 | snapshot at 0.35 (tiny preset)")
    assert not any(line.startswith("warning") for line in out)
    train.main(["--out", str(tmp_path / "r"), "--resume", "--steps", "3"])  # the checkpoint gives them all
    assert "v target, cosine schedule, l1 loss, ln sigma_t ~ N(0,1.2), T 1000 | lr 0.002 after 1 warm-up steps, then " \
           "cosine to 0 | EMA 0.995 | batch 4 | snapshot at 0.35" in capsys.readouterr().out.splitlines()
    ckpt = torch.load(tmp_path / "r" / "ckpt.pt", weights_only=True)
    del ckpt["config"]["t_density"]  # as checkpoints were written before --t-density: they drew t uniformly
    torch.save(ckpt, tmp_path / "r" / "ckpt.pt")
    train.main(["--out", str(tmp_path / "r"), "--resume", "--steps", "4"])
    assert "v target, cosine schedule, l1 loss, T 1000 | lr 0.002 after 1 warm-up steps, then cosine to 0 | EMA " \
           "0.995 | batch 4 | snapshot at 0.35" in capsys.readouterr().out.splitlines()
    args, *_ = train.parse_args(["--model", "paper", "--steps", "40", "--out", str(tmp_path / "p")])
    assert train.recipe_line(args) == (
        "eps target (paper preset), linear schedule (paper preset), mse loss, T 1000 | lr 0.0002 (paper preset) after "
        "5000 warm-up steps (paper preset), then constant (paper preset) | EMA 0.9999 (paper preset) | batch 128 "
        "(paper preset)")
    train.warn_if_warmup_outlasts(args)
    assert capsys.readouterr().out == ("warning: --warmup 5000 (the paper preset's) outlasts the run's 40 steps: the "
                                       "learning rate reaches 1.6e-06, not --lr 0.0002; give --warmup 4, say (a tenth "
                                       "of the run)\n")


def test_a_time_budget_warns_of_a_warm_up_longer_than_the_steps_it_plans(folder, tmp_path, capsys):
    train.main(["--data", str(folder), "--out", str(tmp_path / "r"), "--time", "2s", *TINY, "--warmup", "100000"])
    out = capsys.readouterr().out.splitlines()
    planned = next(i for i, line in enumerate(out) if line.startswith("--time 0m02s: "))
    assert not any("warning" in line for line in out[:planned])  # no steps to compare with before
    assert out[planned + 1].startswith("warning: --warmup 100000 outlasts the run's "), out


def test_every_unreadable_image_is_named_and_a_run_from_the_cache_names_them_again(folder, tmp_path, capsys):
    broken = [folder / f"broken{i:02d}.png" for i in range(22)]
    for p in broken:
        p.write_bytes(b"\x89PNG garbage")
    for out in ("a", "b"):  # b: the cache a's decode wrote
        train.main(["--data", str(folder), "--out", str(tmp_path / out), "--steps", "1", *TINY])
        lines = capsys.readouterr().out.splitlines()
        first = lines.index("skipped 22 unreadable image file(s) of 34:")
        named = lines[first + 1:first + 21]
        assert [line.split(": ")[0] for line in named] == [f"  {p}" for p in broken[:20]], named
        assert all("not a readable image" in line for line in named) and lines[first + 21] == "  ... and 2 more"
    assert not any(line.startswith("decoded") for line in lines)  # b read the cache


def test_a_conditional_grid_holds_at_most_sample_n_images_and_every_class_that_fits(folder, tmp_path, capsys):
    def grid(classes, n):
        args = argparse.Namespace(cond=True, sample_n=n)
        y, size, nrow = train.grid_labels(argparse.Namespace(args=args, classes=list(range(classes)), device="cpu"))
        return y.tolist(), size, nrow
    assert grid(200, 64) == ([i * 200 // 64 for i in range(64)], 64, 8)  # not 1,600: 64 classes spread, one each
    assert grid(10, 64) == ([c for c in range(10) for _ in range(6)], 60, 6)  # all ten digits, a row of 6 each
    assert grid(200, 2)[:2] == ([0, 100], 2) and grid(3, 64)[1:] == (24, 8)
    train.main(["--data", str(folder), "--out", str(tmp_path / "r"), "--steps", "1", *TINY, "--cond"])
    assert "sample grids show" not in capsys.readouterr().out  # --sample-n 8 holds both classes, a row of 4 each
    assert Image.open(tmp_path / "r" / "samples" / "step_0000001.png").size == (4 * 18 + 2, 2 * 18 + 2)
    train.main(["--data", str(folder), "--out", str(tmp_path / "r1"), "--steps", "1", *TINY, "--cond", "--sample-n", "1"])
    assert "sample grids show 1 of the 2 classes, one image each, spread in order: blue, ..., blue (--sample-n 1; " \
           "give 2 for all)" in capsys.readouterr().out


def test_img_per_s_counts_the_time_of_the_steps_alone(folder, tmp_path, monkeypatch):
    hours = []  # each call of between_steps: an hour of grids, FIDs and checkpoints, or a pause, on train.py's clock
    clock = types.SimpleNamespace(time=time.time, strftime=time.strftime,
                                  perf_counter=lambda: time.perf_counter() + 3600 * len(hours))
    monkeypatch.setattr(train, "time", clock)
    monkeypatch.setattr(train, "between_steps", lambda run, done, stop: hours.append(done))
    train.main(["--data", str(folder), "--out", str(tmp_path / "r"), "--steps", "2", *TINY])
    [m] = [json.loads(line) for line in open(tmp_path / "r" / "metrics.jsonl")]
    assert hours == [1, 2] and m["step"] == 2 and m["img_per_s"] > 0.1  # with the hour: 8 images in 3600 s
