"""Bad input to train.py and sample.py, as tables: each case must end with exit status 2 and one line on
stderr that names the flag or file, with no traceback, before any work, and leave an existing run folder as
it was. Then the faults of a running process: signals, a closed stdout, a second process on the same run."""
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import data
import ddpm
import sample
import train
from test_train import TINY, run

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """A finished 2-step tiny run (v target, cosine schedule, 3 channels, 16x16) and files to misuse."""
    top = tmp_path_factory.mktemp("bad")
    images = top / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in range(4):
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(images / f"{i}.png")
    train.main(["--data", str(images), "--out", str(top / "run"), "--steps", "2", *TINY])
    Image.fromarray(np.zeros((16, 16), np.uint8)).save(top / "black.png")
    Image.fromarray(np.tile(np.array([0, 1], np.uint8), (16, 8))).save(top / "zero_one.png")
    (top / "text.txt").write_text("not an image")
    os.mkfifo(top / "fifo.pt")
    (top / "full").mkdir()
    (top / "full" / "old.png").write_bytes((images / "0.png").read_bytes())
    for name, config in {"steps_float": {"steps": 2.7}, "model": {"model": "huge"}, "bool": {"cosine": "false"},
                         "unknown": {"bogus": 1}, "list": {"lr": [1e-3]}, "array": [1, 2], "size_list": {"size": [16]},
                         "bool_int": {"steps": True}, "auto": {"auto": "channels"}, "auto_lr": {"auto": ["lr"]},
                         "auto_bad": {"channels": "banana", "auto": ["channels"]},
                         "fid": {"fid_every": 5, "fid_ref": str(images)}}.items():
        (top / f"{name}.json").write_text(json.dumps(config))
    (top / "garbage.json").write_text("{not json")
    (top / "dangling.png").symlink_to(top / "nowhere" / "x.png")
    (top / "link").symlink_to(images)
    ckpt = torch.load(top / "run" / "ckpt.pt", weights_only=True)
    torch.save(dict(ckpt, diffusion=dict(ckpt["diffusion"], schedule="linear")), top / "other.pt")  # another diffusion
    ckpt["ema"]["conv_in.weight"][0, 0, 0, 0] = float("nan")
    (top / "nan").mkdir()
    torch.save(ckpt, top / "nan" / "ckpt.pt")
    ckpt["format"] = 99
    torch.save(ckpt, top / "future.pt")
    torch.save({"model": Code(str(top / "ran"))}, top / "code.pt")
    whole = (top / "run" / "ckpt.pt").read_bytes()
    (top / "cut.pt").write_bytes(whole[:len(whole) // 2])  # a copy or download that stopped halfway
    (top / "cut_early.pt").write_bytes(whole[:5000])  # torch's own error for this cut is "Invalid argument"
    (top / "empty.pt").write_bytes(b"")
    (top / "moved.pt").symlink_to(top / "nowhere" / "ckpt.pt")
    edits = {"ema_none": lambda c: c.update(ema=None), "format_true": lambda c: c.update(format=True),  # by hand
             "classes_none": lambda c: c.update(classes=None)}
    for name, edit in edits.items():
        ckpt = torch.load(top / "run" / "ckpt.pt", weights_only=True)
        edit(ckpt)
        torch.save(ckpt, top / f"{name}.pt")
    Image.fromarray(np.full((16, 32), 255, np.uint8)).save(top / "wide.png")
    return top


class Code:
    """A pickle that would run code when loaded: it must be refused, not run."""
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def snapshot(folder):
    return {p: (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(Path(folder).rglob("*"))}


def refused(main, argv, words, made, capsys):
    before = snapshot(made / "run")
    with pytest.raises(SystemExit) as e:
        main([w.replace("{d}", str(made)) for w in argv])
    err = capsys.readouterr().err
    assert e.value.code == 2, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    for w in words:
        assert w.replace("{d}", str(made)) in err, err
    assert snapshot(made / "run") == before


RUN = ["--out", "{d}/run"]
TRAIN = [  # (flags, words the error line must hold); the run folder {d}/run holds a finished run
    (["--batch", "0"], ["--batch", "[1, inf)"]),
    (["--batch", "-4"], ["--batch"]),
    (["--batch", "6", "--accum", "4"], ["--batch 6", "divisible"]),
    (["--accum", "0"], ["--accum"]),
    (["--accum", "-1"], ["--accum"]),
    (["--steps", "0"], ["--steps"]),
    (["--steps", "1.5"], ["--steps", "integer"]),
    (["--time", "0s"], ["--time", "between 1 second"]),
    (["--time", "15x"], ["--time", "not a duration", "15m"]),
    (["--time=-5m"], ["--time", "not a duration"]),
    (["--time", "5m", "--steps", "10"], ["--time", "--steps", "not both"]),
    (["--resume", "--time", "5m"], ["--time", "resumed run"]),
    (["--time", "5m", "--fid-every", "5", "--fid-ref", "{d}/images"], ["--time", "--fid-every"]),
    (["--log-every", "0"], ["--log-every"]),
    (["--ckpt-every", "0"], ["--ckpt-every"]),
    (["--sample-every", "-1"], ["--sample-every"]),
    (["--sample-n", "0"], ["--sample-n"]),
    (["--T", "0"], ["--T"]),
    (["--T", "10", "--schedule", "linear"], ["--T 10", "too small"]),
    (["--T", "100001"], ["--T"]),
    (["--size", "10000"], ["--size", "2048"]),
    (["--size", "0"], ["--size"]),
    (["--size", "abc"], ["--size", "not a size"]),
    (["--size", "16x"], ["--size"]),
    (["--size", "28"], ["--size 28", "24 or 32"]),
    (["--size", "512"], ["--size 512", "shapes"]),
    (["--lr", "0"], ["--lr"]),
    (["--lr", "-1e-3"], ["--lr"]),
    (["--lr", "nan"], ["--lr"]),
    (["--lr", "inf"], ["--lr"]),
    (["--lr-min", "0.1", "--lr", "0.01"], ["--lr-min"]),
    (["--warmup", "-5"], ["--warmup"]),
    (["--ema", "-1"], ["--ema"]),
    (["--ema", "1.5"], ["--ema"]),
    (["--ema", "1"], ["--ema"]),
    (["--p-uncond", "2"], ["--p-uncond"]),
    (["--t-density", "normal"], ["--t-density", "not uniform, edm or P_MEAN,P_STD"]),
    (["--t-density=-1.2,0"], ["--t-density", "P_STD must be in (0, 10]"]),
    (["--t-density", "nan,1"], ["--t-density", "P_MEAN must be in [-20, 20]"]),
    (["--ema-length", "0.5"], ["--ema-length", "(0, 0.28]"]),
    (["--ema", "0.99", "--ema-length", "0.1"], ["--ema and --ema-length: choose one"]),
    (["--norm-groups", "3"], ["--norm-groups", "choose from"]),
    (["--snapshot", "1"], ["--snapshot", "[0, 1)"]),
    (["--grad-clip", "-1"], ["--grad-clip"]),
    (["--weight-decay", "inf"], ["--weight-decay"]),
    (["--seed", "-1"], ["--seed"]),
    (["--model", "huge"], ["--model", "huge"]),
    (["--channels", "2"], ["--channels"]),
    (["--precision", "fp8"], ["--precision"]),
    (["--target", "noise"], ["--target"]),
    (["--device", "cuda" if not torch.cuda.is_available() else "cuda:99"], ["--device", "no such device"]),
    (["--device", "banana"], ["--device banana", "not a device"]),
    (["--fid-every", "5"], ["--fid-every", "--fid-ref"]),
    (["--fid-ref", "{d}/images"], ["--fid-ref", "--fid-every"]),
    (["--fid-every", "5", "--fid-ref", "{d}/missing"], ["--fid-ref", "missing"]),
    (["--fid-every", "5", "--fid-ref", "{d}/images", "--fid-n", "1"], ["--fid-n"]),
    (["--data", "{d}/missing"], ["--data", "missing", "no such folder"]),
    (["--data", "{d}/text.txt"], ["--data", "text.txt"]),
    (["--data", ""], ["--data", "empty path"]),
    (["--out", ""], ["--out", "empty path"]),
    (["--data", "{d}", "--out", "{d}/run"], ["--out", "inside --data"]),
    (["--data", "{d}/link", "--out", "{d}/images/run", "--steps", "1", *TINY], ["--out", "inside --data"]),  # link -> images
    (["--data", "{d}/images", "--out", "{d}/images", "--steps", "1", *TINY], ["--out", "inside --data"]),
    (["--data", "{d}/text.txt"], ["--data", "not a folder"]),
    (["--data", "{d}/a\nb"], ["--data", "a\\nb"]),
    (["--bogus"], ["--bogus"]),
    (["--config", "{d}/missing.json"], ["--config", "missing.json"]),
    (["--config", "{d}/garbage.json"], ["--config", "garbage.json", "JSON"]),
    (["--config", "{d}/array.json"], ["--config", "array.json"]),
    (["--config", "{d}/steps_float.json"], ["steps_float.json", "--steps", "2.7"]),
    (["--config", "{d}/model.json"], ["model.json", "huge"]),
    (["--config", "{d}/bool.json"], ["bool.json", "cosine", "true or false"]),
    (["--config", "{d}/unknown.json"], ["unknown.json", "bogus"]),
    (["--config", "{d}/list.json"], ["list.json", "lr"]),
    (["--config", "{d}/size_list.json"], ["size_list.json", "size"]),
    (["--config", "{d}/bool_int.json"], ["bool_int.json", "steps"]),
    (["--config", "{d}/auto.json"], ["auto.json", "auto", "not a list"]),
    (["--config", "{d}/auto_lr.json"], ["auto_lr.json", "'lr'"]),
    (["--config", "{d}/auto_bad.json"], ["auto_bad.json", "--channels", "banana"]),  # chosen again, still checked
    (["--device", ""], ["--device", "not a device name"]),
    (["--config", "{d}/run/config.json", "--resume"], ["--config", "--resume"]),
    (["--resume", "--steps", "4", "--size", "32"], ["--resume", "--size 32", "16"]),
    (["--resume", "--steps", "4", "--model", "small"], ["--model small"]),
    (["--resume", "--steps", "4", "--target", "eps"], ["--target eps"]),
    (["--resume", "--steps", "4", "--T", "500"], ["--T 500"]),
    (["--resume", "--steps", "4", "--schedule", "linear"], ["--schedule linear"]),
    (["--resume", "--steps", "4", "--channels", "1"], ["--channels 1"]),
    (["--resume", "--steps", "4", "--loss", "l1", "--cond"], ["--loss l1", "--cond True"]),
    (["--resume", "--steps", "2"], ["--steps 2", "already at step 2"]),
    (["--resume", "--steps", "4", "--lr", "0"], ["--lr"]),
    (["--ch", "48"], ["--ch", "48 is not a multiple of 32"]),
    (["--ch", "0"], ["--ch", "[32, inf)"]),
    (["--ch-mult", "1,x"], ["--ch-mult", "like 1,2,2,2"]),
    (["--ch-mult", "0"], ["--ch-mult"]),
    (["--num-res-blocks", "0"], ["--num-res-blocks"]),
    (["--dropout", "1"], ["--dropout", "[0, 1)"]),
    (["--attn-res", "16x16"], ["--attn-res", "like 16,8"]),
    (["--model", "tiny", "--size", "16", "--ch-mult", "1,2,2,2,2,2"], ["--ch-mult 1,2,2,2,2,2", "--size 16", "at most 5"]),
    (["--model", "tiny", "--size", "16", "--attn-res", "12"], ["--attn-res 12", "its levels: 16, 8, 4; or none"]),
    (["--resume", "--steps", "4", "--ch", "64"], ["--resume", "--ch 64 (the checkpoint's: 32)"]),
    (["--resume", "--steps", "4", "--attn-res", "none"], ["--attn-res none (the checkpoint's: 16)"]),
    (["--precision", "fp16", "--device", "cpu"], ["--precision fp16", "CPU", "bf16, fp32 or auto"]),
    (["--config", "{d}/fid.json", "--time", "5m"], ["--time cannot plan around --fid-every", "(--fid-every from "
                                                    "--config {d}/fid.json)"]),
    (["--model", "tiny", "--lr-min", "0.01"], ["--lr-min 0.01 is above --lr 0.002 (--lr from the tiny preset)"]),
    ([], ["--out", "holds an earlier run", "--resume"]),
]


@pytest.mark.parametrize("argv, words", TRAIN, ids=[" ".join(a) or "fresh run in a used folder" for a, _ in TRAIN])
def test_train_refuses(argv, words, made, capsys):
    refused(train.main, RUN + argv, words, made, capsys)


@pytest.mark.parametrize("argv, words", [
    (["--out", "{d}/text.txt", "--steps", "1"], ["--out", "text.txt", "a file"]),
    (["--out", "{d}/nowhere", "--resume"], ["--resume", "no such checkpoint"]),
    (["--out", "{d}/nan", "--resume", "--steps", "9"], ["non-finite", "conv_in.weight"]),
])
def test_train_refuses_other_folders(argv, words, made, capsys):
    refused(train.main, argv, words, made, capsys)


CKPT = ["{d}/run/ckpt.pt"]
SAMPLE = [
    (["--eta", "nan", "--sampler", "ddim"], ["--eta"]),
    (["--eta", "5", "--sampler", "ddim"], ["--eta", "[0, 1]"]),
    (["--eta", "0.5"], ["--eta", "ddim"]),
    (["--guidance", "nan"], ["--guidance"]),
    (["--guidance", "-1"], ["--guidance"]),
    (["--guidance", "2"], ["--class/--guidance", "unconditional"]),
    (["--class", "3"], ["--class", "unconditional"]),
    (["--n", "0"], ["--n"]),
    (["--n", "x"], ["--n"]),
    (["--batch-size", "0"], ["--batch-size"]),
    (["--nrow", "0"], ["--nrow"]),
    (["--seed", "-3"], ["--seed"]),
    (["--steps", "0"], ["--steps"]),
    (["--steps", "5000"], ["--steps 5000", "T = 1000"]),
    (["--sampler", "ddpm", "--steps", "10"], ["--steps", "ddpm"]),
    (["--variance", "beta"], ["--variance", "ddpm"]),
    (["--sampler", "euler"], ["--sampler"]),
    (["--grid", "{d}/nodir/x.png"], ["--grid", "nodir", "does not exist"]),
    (["--grid", "{d}/x.txt"], ["--grid", ".png"]),
    (["--grid", "{d}/full.png/"], ["--grid"]),
    (["--out-dir", "{d}/text.txt"], ["--out-dir", "a file"]),
    (["--out-dir", "{d}/text.txt/new/sub"], ["--out-dir", "text.txt is a file"]),
    (["--out-dir", "{d}/full"], ["--out-dir", "--replace"]),
    (["--replace"], ["--replace", "--out-dir"]),
    (["--process", ""], ["--process", "empty path"]),
    (["--forward", ""], ["--forward", "empty path"]),
    (["--out-dir", ""], ["--out-dir", "empty path"]),
    (["--process", "{d}/p.gif", "--grid", "{d}/g.png"], ["--grid", "--process"]),
    (["--grid", "{d}/dangling.png"], ["--grid", "not a regular file"]),
    (["--interp", "0"], ["--interp"]),
    (["--interp", "1"], ["--interp"]),
    (["--interp", "1001"], ["--interp", "not in [2, 1000]"]),  # all frames go through the network at once
    (["--interp", "4", "--sampler", "ddpm"], ["--interp", "deterministic"]),
    (["--process", "{d}/p.jpg"], ["--process", ".gif or .png"]),
    (["--process", "{d}/nodir/p.gif"], ["--process", "does not exist"]),
    (["--process", "{d}/p.gif", "--forward", "{d}/black.png"], ["--forward", "--process"]),
    (["--inpaint", "{d}/black.png"], ["--inpaint", "--mask"]),
    (["--mask", "{d}/black.png"], ["--mask", "--inpaint"]),
    (["--inpaint", "{d}/black.png", "--mask", "{d}/black.png", "--grid", "{d}/i.png"], ["--mask", "nothing to fill"]),
    (["--inpaint", "{d}/black.png", "--mask", "{d}/zero_one.png", "--resample", "0"], ["--resample"]),
    (["--mix", "{d}/black.png", "{d}/black.png", "--weight", "2"], ["--weight"]),
    (["--weight", "0.3"], ["--weight", "--mix"]),
    (["--t", "5"], ["--t", "--forward"]),
    (["--forward", "{d}/black.png", "--t", "5000", "--grid", "{d}/f.png"], ["--t 5000", "T = 1000"]),
    (["--forward", "{d}/text.txt", "--grid", "{d}/f.png"], ["text.txt", "not a readable image"]),
    (["--forward", "{d}/nothing.png", "--grid", "{d}/f.png"], ["nothing.png: no such file"]),
    (["--fid", "{d}/images", "--n", "1"], ["--fid", "--n 2"]),
    (["--fid", "{d}/images", "--process", "{d}/p.gif"], ["--out-dir and --fid", "--process"]),
    (["--device", "banana"], ["--device banana"]),
    (["--device", ""], ["--device", "not a device name"]),
    (["--grid", "{d}/.png"], ["--grid", "give a .png path"]),
    (["--process", "{d}/.gif"], ["--process", "give a .gif or .png path"]),
    (["--forward", "{d}/black.png", "--class", "1"], ["--class and --guidance are not used by --forward"]),
    (["--mix", "{d}/black.png", "{d}/black.png", "--sampler", "ddim"], ["--sampler, --steps, --order and --spacing are not used"]),
    (["--forward", "{d}/black.png", "--order", "3"], ["--sampler, --steps, --order and --spacing are not used"]),
    (["--sampler", "ddim", "--spacing", "logsnr"], ["--order or --spacing is only used with --sampler dpm++"]),
    (["--order", "4"], ["--order", "choose from"]),
    (["--forward", "{d}/black.png", "--n", "3"], ["--n is not used by --forward"]),
    (["--fid-weights", "{d}/w.pth"], ["--fid-weights is only used with --fid"]),
    (["--autoguide", "{d}/run/ckpt.pt"], ["--autoguide needs --guidance w > 0"]),
    (["--autoguide", "{d}/other.pt", "--guidance", "1"], ["--autoguide", "other.pt", "its diffusion", "same run"]),
    (["--autoguide", "{d}/missing.pt", "--guidance", "1"], ["missing.pt", "no such checkpoint"]),
    (["--forward", "{d}/black.png", "--autoguide", "{d}/run/ckpt.pt", "--guidance", "1"], ["--autoguide"]),
    (["--out-dir", "{d}/gen", "--grid", "{d}/gen/sub/g.png"], ["--grid", "inside --out-dir", "FID"]),
    (["--inpaint", "{d}/black.png", "--mask", "{d}/wide.png", "--grid", "{d}/i.png"], ["--mask", "32x16", "16x16"]),
    (["--inpaint", "{d}/black.png", "--mask", "{d}/zero_one.png", "--resample", "2", "--jump", "1000", "--grid",
      "{d}/i.png"], ["--jump 1000", "T = 1000"]),
]


@pytest.mark.parametrize("argv, words", SAMPLE, ids=[" ".join(a) for a, _ in SAMPLE])
def test_sample_refuses(argv, words, made, capsys):
    refused(sample.main, CKPT + argv, words, made, capsys)
    assert not (made / "run" / "samples.png").exists() and not (made / "p.gif").exists()


@pytest.mark.parametrize("argv, words", [
    (["{d}/nan/ckpt.pt"], ["non-finite weights", "ema.conv_in.weight"]),
    (["{d}/missing.pt"], ["missing.pt", "no such checkpoint"]),
    (["{d}/nowhere/ckpt.pt"], ["nowhere/ckpt.pt", "no such checkpoint"]),  # not --grid's missing folder
    (["{d}/fifo.pt"], ["fifo.pt: not a regular file"]),
    (["{d}/cut.pt"], ["cut.pt", "not a loadable checkpoint (empty or cut short"]),
    (["{d}/cut_early.pt"], ["cut_early.pt", "not a loadable checkpoint (empty or cut short"]),
    (["{d}/empty.pt"], ["empty.pt", "not a loadable checkpoint (empty or cut short"]),
    (["{d}/moved.pt"], ["moved.pt: a link to a missing file"]),
    (["{d}/text.txt"], ["text.txt", "not a loadable checkpoint (damaged, or not a file torch.save wrote)"]),
    (["{d}/run"], ["run: a folder, not a checkpoint file"]),
    (["{d}/future.pt"], ["future.pt", "format 99", "another version"]),
    (["{d}/code.pt"], ["code.pt", "Python objects", "none was run"]),
    (["{d}/ema_none.pt"], ["ema_none.pt", "its ema is a NoneType"]),
    (["{d}/format_true.pt"], ["format_true.pt", "its format is a bool"]),
    (["{d}/classes_none.pt"], ["classes_none.pt", "its classes is a NoneType"]),
])
def test_sample_refuses_checkpoints(argv, words, made, capsys):
    refused(sample.main, argv, words, made, capsys)
    assert not (made / "ran").exists()


@pytest.mark.parametrize("argv", [["--n", "4"], ["--interp", "5"]])
def test_sample_out_of_memory_is_one_line_naming_the_knob(argv, made, capsys, monkeypatch):
    def exhausted(*args, **kwargs):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:127] DefaultCPUAllocator: can't allocate memory: 3 GB")
    monkeypatch.setattr(ddpm.Diffusion, "loop", exhausted)  # every sampler and picture runs through it
    refused(sample.main, CKPT + argv + ["--grid", "{d}/oom.png"], ["out of memory on cpu", "--batch-size"], made,
            capsys)


def test_fid_without_fid_py_is_one_line(made, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "fid", None)  # as if sample.py were copied without fid.py
    with pytest.raises(SystemExit) as e:
        sample.main([str(made / "run" / "ckpt.pt"), "--n", "2", "--fid", str(made / "images")])
    assert e.value.code == 2 and "--fid: cannot import fid.py" in capsys.readouterr().err


def test_non_finite_samples_are_an_error_not_a_black_grid(made, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sample.ddpm.Diffusion, "sample", lambda self, model, shape, **kw: torch.full(shape, float("nan")))
    with pytest.raises(SystemExit) as e:
        sample.main([str(made / "run" / "ckpt.pt"), "--n", "3", "--grid", str(tmp_path / "g.png")])
    assert e.value.code == 1 and "3 of 3 samples came out non-finite" in capsys.readouterr().err
    assert not (tmp_path / "g.png").exists()
    with pytest.raises(SystemExit):  # already in fp32: not advised again
        sample.main([str(made / "run" / "ckpt.pt"), "--n", "3", "--grid", str(tmp_path / "g.png"), "--precision", "fp32"])
    assert "try another checkpoint" in capsys.readouterr().err


def test_a_mask_of_zeros_and_ones_fills_its_ones(made):
    hole = sample.load_mask(made / "zero_one.png", (16, 16))
    assert hole.shape == (1, 1, 16, 16) and hole[0, 0, :, 1::2].all() and not hole[0, 0, :, 0::2].any()


def test_out_dir_replace_deletes_old_images_only_when_asked(made, tmp_path):
    out = tmp_path / "gen"
    out.mkdir()
    for i in range(5):
        (out / f"stale{i}.png").write_bytes((made / "black.png").read_bytes())
    (out / ".DS_Store").write_bytes(b"a file manager's, never counted by FID: it stays")
    sample.main([str(made / "run" / "ckpt.pt"), "--n", "2", "--steps", "2", "--grid", str(tmp_path / "g.png"),
                 "--out-dir", str(out), "--replace"])
    assert sorted(p.name for p in out.iterdir()) == [".DS_Store", "000000.png", "000001.png"]


def test_out_dir_replace_keeps_what_is_not_an_image_and_names_it(made, tmp_path, capsys):
    out = tmp_path / "gen"
    out.mkdir()
    (out / "stale.png").write_bytes((made / "black.png").read_bytes())
    (out / "notes.ppm").write_bytes(b"P6 1 1 255 abc")  # Pillow reads .ppm, but no tool here counts it as an image
    with pytest.raises(SystemExit) as e:
        sample.main([str(made / "run" / "ckpt.pt"), "--n", "2", "--out-dir", str(out), "--replace"])
    assert e.value.code == 2 and "notes.ppm" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["notes.ppm", "stale.png"]


def test_out_dir_is_checked_where_the_kernel_resolves_it(made, tmp_path, capsys):
    (tmp_path / "real" / "inner").mkdir(parents=True)
    (tmp_path / "real" / "out").mkdir()
    (tmp_path / "real" / "out" / "keep.png").write_bytes((made / "black.png").read_bytes())
    (tmp_path / "real" / "out" / "notes.txt").write_text("not an image")
    (tmp_path / "link").symlink_to(tmp_path / "real" / "inner")  # link/../out is real/out, not tmp_path/out
    for replace in ([], ["--replace"]):
        with pytest.raises(SystemExit) as e:
            sample.main([str(made / "run" / "ckpt.pt"), "--n", "2", "--out-dir", str(tmp_path / "link/../out"), *replace])
        assert e.value.code == 2 and "already holds 2 file(s) (e.g. notes.txt)" in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path / "real" / "out")) == ["keep.png", "notes.txt"]
    assert not (tmp_path / "out").exists()


def test_a_refused_run_creates_no_out_dir(made, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:  # --out-dir passes its check; the checkpoint is refused after it
        sample.main([str(made / "missing.pt"), "--out-dir", str(tmp_path / "a" / "b" / "c")])
    assert e.value.code == 2 and "missing.pt" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


# --- a running training process ----------------------------------------------------------------------------
LONG = ["--data", "shapes", "--model", "tiny", "--size", "8x16", "--batch", "4", "--precision", "fp32", "--steps", "100000",
        "--log-every", "1", "--sample-every", "0", "--ckpt-every", "5"]


def start(out, *extra, stdout=subprocess.PIPE):
    return subprocess.Popen([sys.executable, str(ROOT / "train.py"), "--out", str(out), *LONG, *extra],
                            stdout=stdout, stderr=subprocess.PIPE, text=True)


def wait_for_step(proc, step):
    for line in proc.stdout:
        if line.startswith(f"step {step}/"):
            return
    pytest.fail(f"the run ended before step {step}: {proc.stderr.read()}")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP, signal.SIGINT])
def test_a_signal_finishes_the_step_saves_and_resumes(sig, tmp_path):
    proc = start(tmp_path / "r")
    wait_for_step(proc, 2)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + sig, err
    assert f"stopped by {sig.name}: saved" in out and "Traceback" not in err
    ckpt = torch.load(tmp_path / "r" / "ckpt.pt", weights_only=True)
    step = ckpt["step"]
    assert step >= 2 and ckpt["classes"] == []  # the shapes without --cond have no classes, as a folder has none
    r = run("train.py", "--out", tmp_path / "r", "--resume", "--steps", step + 1)
    assert r.returncode == 0 and f"resumed {tmp_path / 'r' / 'ckpt.pt'} at step {step}" in r.stdout, r.stderr


def test_a_second_process_is_refused_and_a_killed_ones_lock_does_not_block(tmp_path):
    proc = start(tmp_path / "r")
    wait_for_step(proc, 6)  # a checkpoint exists from step 5
    for extra in ([], ["--resume"]):
        r = run("train.py", "--out", tmp_path / "r", *LONG, *extra)
        assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert f"is in use by train.py process {proc.pid}" in r.stderr
    proc.kill()
    proc.wait()
    step = torch.load(tmp_path / "r" / "ckpt.pt", weights_only=True)["step"]
    r = run("train.py", "--out", tmp_path / "r", "--resume", "--steps", step + 1)
    assert r.returncode == 0 and "resumed" in r.stdout, r.stderr


def test_a_closed_stdout_does_not_stop_training(tmp_path):
    proc = start(tmp_path / "r", "--steps", "8")
    proc.stdout.close()  # like `train.py ... | head -1` once head has exited
    assert proc.wait(timeout=300) == 0, proc.stderr.read()
    assert torch.load(tmp_path / "r" / "ckpt.pt", weights_only=True)["step"] == 8


def test_the_checkpoint_is_saved_before_the_final_grid(made, tmp_path, monkeypatch, capsys):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt("SIGINT")
    monkeypatch.setattr(data, "save_grid", interrupted)
    with pytest.raises(SystemExit) as e:
        train.main(["--data", str(made / "images"), "--out", str(tmp_path / "r"), "--steps", "3", *TINY])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 128 + signal.SIGINT and len(err.splitlines()) == 1
    assert err.endswith(f"stopped by SIGINT; the checkpoint {tmp_path / 'r' / 'ckpt.pt'} (step 3) is saved")
    assert torch.load(tmp_path / "r" / "ckpt.pt", weights_only=True)["step"] == 3


def test_extending_a_cosine_run_replans_the_annealing_and_says_so(made, tmp_path, capsys):
    # warm-up 2 is shorter than the runs, so the annealing itself is what is checked
    common = ["--data", str(made / "images"), *TINY, "--cosine", "--warmup", "2", "--log-every", "1"]
    train.main([*common, "--out", str(tmp_path / "a"), "--steps", "4"])
    train.main(["--out", str(tmp_path / "a"), "--resume", "--steps", "8"])
    train.main([*common, "--out", str(tmp_path / "b"), "--steps", "8"])
    out = capsys.readouterr().out
    assert "with changed settings: --steps 4 -> 8" in out and "learning rate is re-planned from these settings" in out
    lrs = [[json.loads(line)["lr"] for line in open(tmp_path / r / "metrics.jsonl")] for r in "ab"]
    assert lrs[0][4:] == lrs[1][4:] and lrs[0][3] < lrs[1][3]  # steps 5-8 as the 8-step run; step 4 had annealed


def test_an_error_without_a_message_is_named_by_its_kind():  # RuntimeError("") crashed the checkpoint error
    assert [data.one_line(e, last=True) for e in (OSError(), RuntimeError(""), RuntimeError("a\n b "))] == \
        ["OSError", "RuntimeError", "b"]


def test_colour_images_for_a_one_channel_model_are_pillows_luma(made):
    colours = np.random.default_rng(0).integers(0, 256, (1, 256, 256, 3), dtype=np.uint8)  # 0.299 R + ... rounded
    grey = np.asarray(Image.fromarray(colours[0]).convert("L"))  # differs from it for ~1 in 2000 colours
    x = data.batch_images(torch.from_numpy(colours).permute(0, 3, 1, 2), [0], torch.device("cpu"), False, 1)
    assert x.shape == (1, 1, 256, 256) and np.array_equal(((x[0, 0] + 1) * 127.5).round().numpy(), grey)


def test_resume_refuses_renamed_class_folders_or_other_classes(tmp_path, capsys):
    for c in ("cats", "dogs"):
        (tmp_path / "data" / c).mkdir(parents=True)
        for i in range(2):
            Image.fromarray(np.full((16, 16, 3), 60 * i, np.uint8)).save(tmp_path / "data" / c / f"{i}.png")
    train.main(["--data", str(tmp_path / "data"), "--out", str(tmp_path / "r"), "--cond", "--steps", "1", *TINY])
    (tmp_path / "data" / "dogs").rename(tmp_path / "data" / "wolves")
    capsys.readouterr()
    refused_elsewhere = snapshot(tmp_path / "r")
    with pytest.raises(SystemExit) as e:
        train.main(["--out", str(tmp_path / "r"), "--resume", "--steps", "2"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "classes of --data" in err and "wolves" in err and "dogs" in err
    assert snapshot(tmp_path / "r") == refused_elsewhere
    with pytest.raises(SystemExit) as e:  # the built-in shapes' classes are checked too: its 4 labels would take 2
        train.main(["--out", str(tmp_path / "r"), "--resume", "--steps", "2", "--data", "shapes"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "(circle, square, triangle, cross) are not the checkpoint's (cats, dogs)" in err
    assert snapshot(tmp_path / "r") == refused_elsewhere


def test_resume_keeps_the_network_and_diffusion_its_checkpoint_built_whatever_its_config_says(made, tmp_path, capsys):
    shutil.copytree(made / "run", tmp_path / "r")
    ckpt = torch.load(tmp_path / "r" / "ckpt.pt", weights_only=True)
    ckpt["config"].update(T=500, size="32")  # edited by hand: it would resume one diffusion and network as another
    torch.save(ckpt, tmp_path / "r" / "ckpt.pt")
    train.main(["--out", str(tmp_path / "r"), "--resume", "--steps", str(ckpt["step"] + 1)])
    resumed = torch.load(tmp_path / "r" / "ckpt.pt", weights_only=True)
    assert resumed["diffusion"]["T"] == 1000 and resumed["config"]["T"] == 1000 and resumed["config"]["size"] == "16"


def test_resume_refuses_a_checkpoint_cut_down_for_sampling_before_decoding_the_data(made, tmp_path, capsys):
    shutil.copytree(made / "run", tmp_path / "r")
    ckpt = torch.load(tmp_path / "r" / "ckpt.pt", weights_only=True)
    del ckpt["optimizer"], ckpt["scaler"]  # what sample.py needs, a third of the file
    torch.save(ckpt, tmp_path / "r" / "ckpt.pt")
    with pytest.raises(SystemExit) as e:
        train.main(["--out", str(tmp_path / "r"), "--resume", "--steps", "3", "--no-cache"])
    out, err = capsys.readouterr()
    assert e.value.code == 2 and "holds no optimizer state (cut down for sampling?)" in err and "start a new run" in err
    assert "decoded" not in out  # refused before the data


def test_a_half_written_metrics_line_and_a_precision_change_do_not_stop_a_resume(made, tmp_path, capsys):
    train.main(["--data", str(made / "images"), "--out", str(tmp_path / "r"), "--steps", "2", *TINY])
    with open(tmp_path / "r" / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "lo')  # what a kill during an append leaves
    train.main(["--out", str(tmp_path / "r"), "--resume", "--steps", "4", "--precision", "bf16"])
    steps = [json.loads(line)["step"] for line in open(tmp_path / "r" / "metrics.jsonl")]
    assert steps == [2, 4] and torch.load(tmp_path / "r" / "ckpt.pt", weights_only=True)["step"] == 4


def test_a_refused_start_leaves_out_as_it_was(tmp_path, capsys):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "a.png").write_bytes(b"\x89PNG garbage")  # refused after the run folder was claimed
    (tmp_path / "empty").mkdir()
    for out in (tmp_path / "new" / "run", tmp_path / "empty"):
        with pytest.raises(SystemExit) as e:
            train.main(["--data", str(tmp_path / "data"), "--out", str(out), "--steps", "1", *TINY])
        assert e.value.code == 2 and "none of the 1 image files could be read" in capsys.readouterr().err
    assert not (tmp_path / "new").exists() and os.listdir(tmp_path / "empty") == []  # no .lock, no samples/


def test_fid_is_switched_off_on_resume_or_over_a_config_and_an_inherited_setting_is_never_blamed(made, tmp_path,
                                                                                                 capsys):
    shutil.copytree(made / "run", tmp_path / "r")
    ckpt = torch.load(tmp_path / "r" / "ckpt.pt", weights_only=True)
    ckpt["config"].update(fid_every=2, fid_ref=str(made / "images"), fid_n=4)  # a run with FID during training
    torch.save(ckpt, tmp_path / "r" / "ckpt.pt")
    (tmp_path / "c.json").write_text(json.dumps(ckpt["config"]))
    train.main(["--out", str(tmp_path / "r"), "--resume", "--steps", "3", "--fid-every", "0"])
    assert f"--fid-ref {made / 'images'} is dropped: it is only used with --fid-every, which the command line " \
           "turned off" in capsys.readouterr().out
    assert json.loads((tmp_path / "r" / "config.json").read_text())["fid_ref"] is None
    train.main(["--config", str(tmp_path / "c.json"), "--out", str(tmp_path / "b"), "--steps", "1", "--fid-ref", ""])
    assert f"--config {tmp_path / 'c.json'}: --fid-every 2 is dropped" in capsys.readouterr().out
    assert json.loads((tmp_path / "b" / "config.json").read_text())["fid_every"] == 0
    ckpt["config"].update(precision="fp16")  # trained on a GPU
    torch.save(ckpt, tmp_path / "r" / "ckpt.pt")
    with pytest.raises(SystemExit):
        train.main(["--out", str(tmp_path / "r"), "--resume", "--steps", "4", "--device", "cpu"])
    assert f"(--precision from the checkpoint {tmp_path / 'r' / 'ckpt.pt'})" in capsys.readouterr().err


def test_a_checkpoint_from_before_the_network_flags_resumes_its_own_network(made, tmp_path):
    shutil.copytree(made / "run", tmp_path / "r")
    ckpt = torch.load(tmp_path / "r" / "ckpt.pt", weights_only=True)
    for k in ("ch", "ch_mult", "num_res_blocks", "dropout", "attn_res"):
        del ckpt["config"][k]
    torch.save(ckpt, tmp_path / "r" / "ckpt.pt")
    train.main(["--out", str(tmp_path / "r"), "--resume", "--steps", "3"])
    cfg = json.loads((tmp_path / "r" / "config.json").read_text())
    assert [cfg[k] for k in ("ch", "ch_mult", "num_res_blocks", "dropout", "attn_res")] == [32, "1,2,2", 1, 0.0, "16"]
