"""diffusers-format DDPMs (data.load_diffusers, data.export_diffusers, sample.py DIR and --export-diffusers) against
diffusers' own numbers: random-weight UNet2DModels saved by diffusers 0.42's save_pretrained in the block layouts of
google/ddpm-cifar10-32 and google/ddpm-church-256, with the noise diffusers predicted for them (reference.npz; see
tests/fixtures/README.md). The church one (8.5 MB) is read from the reference folder ../shared where it is present."""
import json
import os
import re
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

import data
import ddpm
import sample
import unet
from conftest import FIXTURES, ROOT

CIFAR = FIXTURES / "ddpm-cifar10-32-small"
CHURCH = ROOT.parent / "shared" / "diffusers" / "ddpm-church-256-small"
PARAMETERS = {CIFAR.name: 1_728_259, CHURCH.name: 2_123_331}  # diffusers' count (the fixtures' README)
WEIGHTS = "diffusion_pytorch_model.safetensors"
PAPER = dict(schedule="linear", T=1000, target="eps", loss="mse")
OLD_NAMES = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}  # the Hub's .bin files' names


pytestmark = pytest.mark.usefixtures("one_thread")  # (conftest.py)


def noise_error(ckpt, reference=CIFAR):
    """The largest difference between the network's eps and diffusers' on the reference inputs, and the network."""
    model, _ = data.build(ckpt)
    with np.load(reference / "reference.npz") as f, torch.no_grad():
        eps = model(torch.from_numpy(f["x"]), torch.from_numpy(f["t"]))
        return (eps - torch.from_numpy(f["eps"])).abs().max().item(), model


def copy_of(folder, tmp_path, unet_settings=None, scheduler_settings=None):
    """A copy of a fixture folder with settings changed in its config files; the weights file is linked."""
    out = tmp_path / folder.name
    shutil.copytree(folder, out, ignore=shutil.ignore_patterns(WEIGHTS))
    os.symlink(folder / "unet" / WEIGHTS, out / "unet" / WEIGHTS)
    for file, changes in (("unet/config.json", unet_settings), ("scheduler/scheduler_config.json", scheduler_settings)):
        (out / file).write_text(json.dumps({**json.loads((out / file).read_text()), **(changes or {})}))
    return out


def grid(*argv):
    """sample.main(argv) and the grid it wrote, as an array."""
    path = os.path.join(os.path.dirname(argv[0]), "grid.png")
    sample.main([*map(str, argv), "--grid", path, "--precision", "fp32"])
    return np.asarray(Image.open(path))


def refused(capsys, argv, *words):
    with pytest.raises(SystemExit) as e:
        sample.main([*map(str, argv)])
    err = capsys.readouterr().err
    assert e.value.code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert all(w in err for w in words), err


@pytest.mark.parametrize("folder", [CIFAR, CHURCH], ids=["cifar10-32", "church-256"])
def test_the_network_predicts_the_noise_diffusers_predicts(folder):
    if not folder.is_dir():
        pytest.skip(f"needs {folder}, in the reference folder ../shared beside the repository")
    ckpt = data.load_diffusers(str(folder))
    error, model = noise_error(ckpt, folder)
    assert error < 1e-5, error  # |eps| is 0.3 on average: a wrong mapping is off by that much
    assert sum(w.numel() for w in model.parameters()) == PARAMETERS[folder.name]
    assert ckpt["diffusion"] == PAPER and ckpt["variance"] == "beta_tilde"  # its scheduler's fixed_small


def test_a_bare_unet_folder_has_the_papers_diffusion_and_says_so(tmp_path, capsys):
    shutil.copytree(CIFAR / "unet", tmp_path / "unet")
    ckpt = data.load_diffusers(str(tmp_path / "unet"))
    assert "no scheduler/scheduler_config.json; assuming the paper's diffusion" in capsys.readouterr().out
    assert ckpt["diffusion"] == PAPER and ckpt["variance"] is None and noise_error(ckpt)[0] < 1e-5


@pytest.mark.parametrize("old_names", [False, True], ids=["names-of-now", "names-before-diffusers-0.15"])
def test_bin_weights_load_as_the_safetensors_do(old_names, tmp_path):
    folder = copy_of(CIFAR, tmp_path)
    weights = data.read_safetensors(str(CIFAR / "unet" / WEIGHTS))
    if old_names:
        rename = re.compile(r"(\.attentions\.\d+\.)(to_q|to_k|to_v|to_out\.0)\.")
        weights = {rename.sub(lambda m: m[1] + OLD_NAMES[m[2]] + ".", name): w for name, w in weights.items()}
        assert any(".proj_attn." in name for name in weights)
    os.remove(folder / "unet" / WEIGHTS)
    torch.save(weights, folder / "unet" / "diffusion_pytorch_model.bin")
    assert noise_error(data.load_diffusers(str(folder)))[0] < 1e-5


def test_sample_py_samples_a_diffusers_folder_as_the_same_train_py_checkpoint(tmp_path):
    ckpt = data.load_diffusers(str(CIFAR))
    torch.save({k: v for k, v in ckpt.items() if k != "variance"}, tmp_path / "ckpt.pt")
    (tmp_path / "folder").symlink_to(CIFAR)  # (grid() writes beside its first argument)
    from_folder = grid(tmp_path / "folder", "--n", "4", "--steps", "5")
    assert np.array_equal(from_folder, grid(tmp_path / "ckpt.pt", "--n", "4", "--steps", "5"))
    assert from_folder.std() > 20  # four different images, not a blank grid


def test_a_written_folder_is_the_fixture_byte_for_byte(tmp_path, capsys):
    sample.main([str(CIFAR), "--export-diffusers", str(tmp_path / "out")])
    assert "wrote" in capsys.readouterr().out
    for file in ("model_index.json", "unet/config.json", f"unet/{WEIGHTS}"):  # diffusers' own files
        assert (tmp_path / "out" / file).read_bytes() == (CIFAR / file).read_bytes(), file
    written, fixture = (json.loads((f / "scheduler/scheduler_config.json").read_text()) for f in (tmp_path / "out", CIFAR))
    assert written.keys() == fixture.keys() and written["variance_type"] == fixture["variance_type"]
    assert [name for name in os.listdir(tmp_path) if name != "out"] == []  # no temporary folder left


def tiny_checkpoint(path, classes=(), **network):
    """An 8x8 tiny-preset checkpoint without AdaGN, which diffusers lacks (cosine, T = 50, v target; `network` over
    those) with random weights, its
    EMA weights other ones: an untrained network's last layers are zero, and it would predict 0 whatever the mapping."""
    torch.manual_seed(0)
    model_config = unet.model_config("tiny", (8, 8), 3, len(classes), **{"scale_shift": False, **network})
    model, ema = unet.UNet(**model_config), unet.UNet(**model_config)
    with torch.no_grad():
        for w in [*model.parameters(), *ema.parameters()]:
            w.normal_(0, 0.2)
    torch.save(data.checkpoint_state(0, {}, model_config, ddpm.Diffusion("cosine", 50, "v"), list(classes), model, ema,
                                     torch.optim.Adam(model.parameters()), torch.amp.GradScaler("cpu", enabled=False), 0),
               path)
    return path


def test_an_exported_checkpoint_is_the_same_network_diffusion_and_samples(tmp_path):
    ckpt = tiny_checkpoint(tmp_path / "ckpt.pt")
    sample.main([str(ckpt), "--export-diffusers", str(tmp_path / "ema")])
    (tmp_path / "raw").mkdir()  # an empty folder may be the destination (made first, as users do)
    sample.main([str(ckpt), "--export-diffusers", str(tmp_path / "raw"), "--no-ema"])
    original, x, t = torch.load(ckpt, weights_only=True), torch.randn(2, 3, 8, 8), torch.tensor([3, 40])
    for folder, ema in (("ema", True), ("raw", False)):
        loaded = data.load_diffusers(str(tmp_path / folder))
        with torch.no_grad():
            assert torch.equal(data.build(loaded)[0](x, t), data.build(original, ema)[0](x, t)), folder
        assert loaded["diffusion"] == original["diffusion"]
    written = json.loads((tmp_path / "ema" / "unet" / "config.json").read_text())
    assert written.keys() == json.loads((CIFAR / "unet" / "config.json").read_text()).keys()
    # the ancestral sampler's default variance: a train.py checkpoint's (beta) as fixed_large, or its scheduler's
    beta = grid(ckpt, "--sampler", "ddpm", "--n", "2")
    assert np.array_equal(grid(tmp_path / "ema", "--sampler", "ddpm", "--n", "2"), beta)
    scheduler = tmp_path / "ema" / "scheduler" / "scheduler_config.json"
    scheduler.write_text(json.dumps({**json.loads(scheduler.read_text()), "variance_type": "fixed_small"}))
    tilde = grid(ckpt, "--sampler", "ddpm", "--n", "2", "--variance", "beta_tilde")
    assert np.array_equal(grid(tmp_path / "ema", "--sampler", "ddpm", "--n", "2"), tilde) and not np.array_equal(beta, tilde)


@pytest.mark.parametrize("unet_settings, scheduler_settings, words", [
    ({"act_fn": "gelu"}, {}, ["config.json: act_fn \"gelu\"", "silu"]),
    ({"resnet_time_scale_shift": "scale_shift"}, {}, ["resnet_time_scale_shift \"scale_shift\""]),
    ({"attention_head_dim": 8}, {}, ["attention_head_dim 8"]),  # 4 heads at 32 channels, 8 at 64
    ({"flip_sin_to_cos": True}, {}, ["flip_sin_to_cos true"]),
    ({"num_class_embeds": 10}, {}, ["num_class_embeds 10"]),
    ({"up_block_types": ["AttnUpBlock2D", "UpBlock2D", "UpBlock2D", "UpBlock2D"]}, {}, ["up_block_types"]),
    ({}, {"beta_schedule": "scaled_linear"}, ["scheduler_config.json: beta_schedule \"scaled_linear\""]),
    ({}, {"beta_end": 0.012}, ["beta_end 0.012", "linear betas to 0.02"]),
    ({}, {"trained_betas": [0.1, 0.2]}, ["trained_betas [0.1, 0.2]"]),
    ({}, {"variance_type": "learned_range"}, ["variance_type \"learned_range\""]),
    ({"layers_per_block": "2"}, {}, ["config.json: layers_per_block \"2\"", "whole number"]),  # not a TypeError's
    ({"layers_per_block": 0}, {}, ["layers_per_block 0", "at least 1"]),  # not a weight "of another model"
    ({"in_channels": True, "out_channels": 1}, {}, ["in_channels true"]),  # not 1 channel
    ({"dropout": None}, {}, ["dropout null", "[0, 1)"]),
], ids=["act_fn", "scale_shift", "heads", "flip_sin_to_cos", "classes", "up_blocks", "schedule", "beta_end",
        "trained_betas", "learned_variance", "layers_text", "no_layers", "channels_bool", "dropout_null"])
def test_what_this_network_or_diffusion_cannot_be_is_refused_in_one_line(unet_settings, scheduler_settings, words,
                                                                         tmp_path, capsys):
    folder = copy_of(CIFAR, tmp_path, unet_settings, scheduler_settings)
    refused(capsys, [folder, "--grid", tmp_path / "g.png"], *words)


@pytest.mark.parametrize("damage, words", [
    ("cut", ["diffusion_pytorch_model.safetensors: not a readable safetensors file"]),
    ("extra", ["extra.weight has no place"]),
    ("missing", ["conv_in.bias is missing"]),
    ("header", ["not a readable safetensors file", "a header of 9223372036854775808 bytes"]),  # not "missing"
    ("nan", ["non-finite weights in conv_in.bias"]),  # before sampling, not "samples came out non-finite"
])
def test_a_damaged_or_foreign_weights_file_is_refused_in_one_line(damage, words, tmp_path, capsys):
    folder = copy_of(CIFAR, tmp_path)
    path = folder / "unet" / WEIGHTS
    blob, weights = path.read_bytes(), data.read_safetensors(str(path))
    path.unlink()
    if damage == "cut":
        path.write_bytes(blob[:len(blob) // 2])
    elif damage == "header":  # a size far beyond the file, before a header that would read as no tensors
        path.write_bytes((2 ** 63).to_bytes(8, "little") + b"{}")
    else:
        weights = {**weights, "extra.weight": torch.zeros(1)} if damage == "extra" else \
            {**weights, "conv_in.bias": weights["conv_in.bias"] * float("nan")} if damage == "nan" else \
            {k: w for k, w in weights.items() if k != "conv_in.bias"}
        with open(path, "wb") as f:
            data.write_safetensors(f, weights)
    refused(capsys, [folder, "--grid", tmp_path / "g.png"], *words)


def test_a_train_py_run_folder_is_refused_naming_its_checkpoint(tmp_path, capsys):
    (tmp_path / "config.json").write_text(json.dumps({"data": "shapes"}))  # train.py's, no _class_name
    (tmp_path / "ckpt.pt").write_bytes(b"")
    refused(capsys, [tmp_path, "--grid", tmp_path / "g.png"], "a folder, not a checkpoint file (a train.py run's)", f"give {tmp_path / 'ckpt.pt'}")


def test_what_has_no_diffusers_form_is_not_exported(tmp_path, capsys):
    ckpt = tiny_checkpoint(tmp_path / "cond.pt", classes=("a", "b"))
    refused(capsys, [ckpt, "--export-diffusers", tmp_path / "out"], "conditional")
    refused(capsys, [ckpt, "--export-diffusers", tmp_path / "out", "--n", "4"], "leave out --n")
    # diffusers' "scale_shift" blocks leave the middle attention without its GroupNorm: another network
    refused(capsys, [tiny_checkpoint(tmp_path / "adagn.pt", scale_shift=True), "--export-diffusers", tmp_path / "out"],
            "no form of --scale-shift")
    refused(capsys, [CIFAR, "--no-ema"], "--no-ema", "a diffusers folder holds one set of weights")
    refused(capsys, [tiny_checkpoint(tmp_path / "u.pt"), "--export-diffusers", tmp_path], "already exists")  # not empty
    assert sorted(os.listdir(tmp_path)) == ["adagn.pt", "cond.pt", "u.pt"]


def test_init_fine_tunes_a_diffusers_folder_and_resumes_and_refuses_another_network(tmp_path, capsys):
    import train
    images = tmp_path / "images"
    images.mkdir()
    for i in range(6):  # grey: the network's three channels take them as RGB
        Image.fromarray(np.full((20, 24), 40 * i, np.uint8)).save(images / f"{i}.png")
    run, common = tmp_path / "run", ["--data", str(images), "--batch", "2", "--warmup", "1", "--sample-n", "2",
                                     "--precision", "fp32", "--no-cache"]
    train.main(["--init", str(CIFAR), "--out", str(run), "--steps", "2", *common])
    out = capsys.readouterr().out
    assert f"--init {CIFAR}: its weights, a fresh optimizer" in out and "6 images 3x32x32" in out
    ckpt = torch.load(run / "ckpt.pt", weights_only=True)
    fixture = data.load_diffusers(CIFAR)
    assert ckpt["model_config"] == fixture["model_config"] and ckpt["diffusion"] == fixture["diffusion"]
    assert ckpt["config"]["init"] == str(CIFAR) and ckpt["optimizer"]["state"][0]["step"] == 2  # fresh: 2 steps
    moved = max((w - ckpt["model"][k]).abs().max().item() for k, w in fixture["ema"].items())
    assert 0 < moved < 1e-3  # trained from the fixture's weights: two Adam steps of lr 2e-4 move each by about that
    train.main(["--out", str(run), "--resume", "--steps", "3"])  # the weights now come from the checkpoint
    assert torch.load(run / "ckpt.pt", weights_only=True)["step"] == 3
    again = tmp_path / "again"
    train.main(["--init", str(run / "ckpt.pt"), "--out", str(again), "--steps", "1", *common])  # ours too
    assert torch.load(again / "ckpt.pt", weights_only=True)["model_config"] == fixture["model_config"]
    capsys.readouterr()
    for words, said in ((["--size", "64"], "--size 64 (the weights': 32)"), (["--cond"], "--cond True"),
                        (["--resume"], "--init and --resume: choose one"), (["--T", "500"], "--T 500")):
        with pytest.raises(SystemExit) as e:
            train.main(["--init", str(CIFAR), "--out", str(tmp_path / "no"), *common, *words])
        assert e.value.code == 2 and said in capsys.readouterr().err
    assert not (tmp_path / "no").exists()
