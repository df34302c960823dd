"""sample.py on tiny untrained checkpoints made here: which classes a grid shows, --forward without a checkpoint,
the two ways of noising a --mix, writable decoded images, and the null label a --p-uncond 0 run never trained."""
import math

import numpy as np
import pytest
import torch
from PIL import Image

import data
import ddpm
import fid
import sample
import unet

DIGITS = [str(i) for i in range(10)]
FAST = ["--sampler", "ddim", "--steps", "1", "--precision", "fp32"]


pytestmark = pytest.mark.usefixtures("one_thread")  # (conftest.py)


def save_checkpoint(path, classes=(), config=None):
    """An untrained 8x8 tiny-preset checkpoint (cosine, T = 50, v target) as train.py writes one; `classes` make it
    conditional, `config` is its train.py settings."""
    torch.manual_seed(0)
    model_config = unet.model_config("tiny", (8, 8), 3, len(classes))
    model = unet.UNet(**model_config)
    state = data.checkpoint_state(0, config or {}, model_config, ddpm.Diffusion("cosine", 50, "v"), list(classes),
                                    model, model, torch.optim.Adam(model.parameters()),
                                    torch.amp.GradScaler("cpu", enabled=False), 0)
    torch.save(state, path)
    return str(path)


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """Checkpoints: 10 classes trained with label dropout, 2 classes without (--p-uncond 0), 2 classes from a config
    that does not record p_uncond, and unconditional; an 8x8 colour image, a grey one and a mask for it."""
    top = tmp_path_factory.mktemp("sample")
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(top / "colour.png")
    Image.fromarray(rng.integers(0, 256, (8, 8), dtype=np.uint8)).save(top / "grey.png")
    Image.fromarray(np.pad(np.full((4, 4), 255, np.uint8), 2)).save(top / "mask.png")
    return dict(top=top, digits=save_checkpoint(top / "digits.pt", DIGITS, {"p_uncond": 0.1}),
                no_dropout=save_checkpoint(top / "no_dropout.pt", ["a", "b"], {"p_uncond": 0.0}),
                unrecorded=save_checkpoint(top / "unrecorded.pt", ["a", "b"]),
                plain=save_checkpoint(top / "plain.pt"))


def refused(capsys, argv, *words):
    with pytest.raises(SystemExit) as e:
        sample.main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert all(w in err for w in words), err


# Item 8: --n 16 of 10 classes drew 8 images of class 0 and 8 of class 1 and said "classes by row".
def test_too_few_images_for_a_row_per_class_spread_the_classes_in_order(made):
    ckpt = torch.load(made["digits"], weights_only=True)
    assert sample.class_labels(ckpt, None, 0, 16).tolist() == [i * 10 // 16 for i in range(16)]
    assert sorted(set(sample.class_labels(ckpt, None, 0, 10).tolist())) == list(range(10))
    assert sample.class_labels(ckpt, None, 0, 4).tolist() == [0, 2, 5, 7]  # fewer images than classes: spread
    assert sample.class_labels(ckpt, None, 0, None).tolist() == [c for c in range(10) for _ in range(8)]  # the default
    assert sample.class_labels(ckpt, None, 0, 100, nrow=5).tolist() == [i // 5 % 10 for i in range(100)]  # 2 rows each


def test_the_wrote_line_says_which_classes_and_how(made, tmp_path, capsys):
    sample.main([made["digits"], "--n", "16", "--grid", str(tmp_path / "g.png"), *FAST])
    out = capsys.readouterr().out
    assert "classes 0, 1, 2, ..., 8, 9 (10 of 10) in order over the images" in out and "by row" not in out, out
    sample.main([made["digits"], "--nrow", "2", "--grid", str(tmp_path / "g.png"), *FAST])  # the default n: a row each
    assert "20 of 20 images" in (out := capsys.readouterr().out) and "9 (10 of 10) by row" in out, out
    sample.main([made["digits"], "--n", "3", "--grid", str(tmp_path / "g.png"), *FAST])
    assert "classes 0, 3, 6 (3 of 10) in order over the images" in capsys.readouterr().out


# Item 9: --forward needed a checkpoint; --mix noised the pixel blend only.
def test_forward_without_a_checkpoint_draws_what_a_checkpoint_of_that_diffusion_draws(made, tmp_path, capsys,
                                                                                       monkeypatch):
    image, with_ckpt = str(made["top"] / "colour.png"), tmp_path / "with.png"
    sample.main([made["plain"], "--forward", image, "--grid", str(with_ckpt)])  # cosine, T = 50, 8x8, 3 channels
    monkeypatch.chdir(tmp_path)
    sample.main(["--forward", image, "--T", "50", "--schedule", "cosine", "--size", "8"])
    assert "wrote forward.png (8x8, cosine schedule, T = 50)" in capsys.readouterr().out  # in the current folder
    assert np.array_equal(np.asarray(Image.open(tmp_path / "forward.png")), np.asarray(Image.open(with_ckpt)))
    sample.main(["--forward", str(made["top"] / "grey.png"), "--grid", "grey.png"])  # the paper's, train.py's 32
    assert "(32x32, linear schedule, T = 1000)" in capsys.readouterr().out
    assert Image.open(tmp_path / "grey.png").mode == "L"  # one channel, as train.py reads a grey folder


@pytest.mark.parametrize("flags, words", [
    (["--mix", "{top}/colour.png", "{top}/colour.png"], ["give a checkpoint", "only --forward"]),
    (["--n", "2"], ["give a checkpoint"]),
    (["--forward", "{top}/colour.png", "--T", "10"], ["linear schedule with T = 10", "larger T"]),
    (["--forward", "{top}/colour.png", "--t", "50", "--T", "50"], ["--t 50", "(--T)", "T = 50", "at most 49"]),
    (["{plain}", "--forward", "{top}/colour.png", "--T", "50"], ["--T, --schedule or --size", "has its own"]),
    (["{plain}", "--forward", "{top}/colour.png", "--schedule", "cosine"], ["--T, --schedule or --size"]),
    (["{plain}", "--n", "2", "--size", "8"], ["--T, --schedule or --size"]),
    (["{plain}", "--forward", "{top}/colour.png", "--mix-noise", "separate"], ["--mix-noise", "--mix"]),
])
def test_forward_without_a_checkpoint_and_mix_noise_refuse_in_one_line(flags, words, made, capsys):
    paths = {"top": str(made["top"]), "plain": made["plain"]}
    refused(capsys, [f.format(**paths) for f in flags], *words)


def test_a_shared_noise_blend_is_x_t_of_the_blend_and_separate_noises_blend_two_x_t():
    d, w, t = ddpm.Diffusion(), 0.3, torch.tensor([400])
    a, b = torch.rand(2, 1, 3, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    g = torch.Generator().manual_seed(1)
    e1, e2 = torch.randn(a.shape, generator=g), torch.randn(a.shape, generator=g)  # the draws of one seed
    shared = d.noised_blend(a, b, 400, w, "shared", torch.Generator().manual_seed(1))
    torch.testing.assert_close(shared, d.q_sample((1 - w) * a + w * b, t, e1))
    separate = d.noised_blend(a, b, 400, w, "separate", torch.Generator().manual_seed(1))
    torch.testing.assert_close(separate, (1 - w) * d.q_sample(a, t, e1) + w * d.q_sample(b, t, e2))
    zero, s = torch.zeros(1, 1, 400, 400), d.sqrt_one_minus_alphas_cumprod[400].item()  # the noise alone
    for noise, std in (("shared", s), ("separate", math.sqrt((1 - w) ** 2 + w ** 2) * s)):  # 0.76 s: less than x_t's
        assert d.noised_blend(zero, zero, 400, w, noise, g).std().item() == pytest.approx(std, rel=0.01)
    with pytest.raises(ValueError, match="shared' or 'separate"):
        d.noised_blend(a, b, 400, w, "both")


def test_mix_noise_separate_mixes_the_seeds_way(made, tmp_path, capsys):
    image, pictures = str(made["top"] / "colour.png"), {}
    for noise in ([], ["--mix-noise", "shared"], ["--mix-noise", "separate"]):
        grid = tmp_path / f"{len(pictures)}.png"
        sample.main([made["plain"], "--mix", image, str(made["top"] / "grey.png"), "--t", "5", "--grid", str(grid),
                     *noise, "--precision", "fp32"])
        pictures[tuple(noise)] = np.asarray(Image.open(grid))
    assert np.array_equal(pictures[()], pictures[("--mix-noise", "shared")])  # the default: a proper x_t
    assert not np.array_equal(pictures[()], pictures[("--mix-noise", "separate")])


# Item 10: read_image's array was read-only, which torch warns about when it wraps it.
def test_a_decoded_image_is_writable(made):
    pixels = data.read_image(str(made["top"] / "colour.png"), (8, 8))
    assert pixels.flags.writeable  # (torch warns once a process, so the flag is the check that always runs)
    torch.from_numpy(pixels)[0, 0, 0] = 7
    assert pixels[0, 0, 0] == 7


# Item 11: guidance, --inpaint and --mix of a --p-uncond 0 checkpoint used a null label never trained.
@pytest.mark.parametrize("flags, words", [
    (["--class", "a", "--guidance", "3", "--grid", "{top}/g.png"],
     ["--guidance", "null label", "--p-uncond 0", "--class without --guidance"]),
    (["--guidance", "3", "--grid", "{top}/g.png"], ["--guidance", "null label"]),
    (["--process", "{top}/p.png", "--class", "b", "--guidance", "1"], ["--guidance", "null label"]),
    (["--inpaint", "{top}/colour.png", "--mask", "{top}/mask.png", "--grid", "{top}/g.png"],
     ["--inpaint", "null label", "--p-uncond above 0"]),
    (["--mix", "{top}/colour.png", "{top}/grey.png", "--grid", "{top}/g.png"], ["--mix", "null label"]),
])
def test_the_untrained_null_label_is_refused_before_sampling(flags, words, made, capsys, monkeypatch):
    monkeypatch.setattr(ddpm.Diffusion, "predict", lambda *a, **k: pytest.fail("sampled"))
    refused(capsys, [made["no_dropout"], *[f.format(top=made["top"]) for f in flags]], *words)
    assert not (made["top"] / "g.png").exists() and not (made["top"] / "p.png").exists()


def test_classes_without_guidance_sample_and_an_unrecorded_p_uncond_is_the_default(made, tmp_path, capsys):
    grid = str(tmp_path / "g.png")
    sample.main([made["no_dropout"], "--class", "b", "--n", "2", "--grid", grid, *FAST])  # no null label
    sample.main([made["no_dropout"], "--n", "2", "--grid", grid, *FAST])  # a class for each image
    sample.main([made["unrecorded"], "--class", "b", "--guidance", "3", "--n", "2", "--grid", grid, *FAST])  # 0.1
    assert capsys.readouterr().out.count("wrote") == 3


# Issue 29, items 1 and 2: --fid FOLDER took its first n sorted names (one class of class folders) at full size.
def test_fid_reads_a_random_n_of_a_reference_folder_at_the_checkpoints_size(made, tmp_path, capsys, monkeypatch):
    from conftest import fid_weights
    for c in "ab":
        for i in range(10):
            Image.new("RGB", (24, 16), (200 * (c == "a"), 30 * i, 90)).save(tmp_path / f"{c}{i}.png")
            (tmp_path / c).mkdir(exist_ok=True)
            (tmp_path / f"{c}{i}.png").rename(tmp_path / c / f"{i}.png")
    read, sizes, files = fid.read_image, set(), []

    def decoding(path, verify=False, size=None):  # records what is decoded, and at which size
        if not verify:
            files.append(path)
            sizes.add(size)
        return read(path, verify, size)
    monkeypatch.setattr(fid, "read_image", decoding)
    sample.main([made["plain"], "--n", "4", "--grid", str(tmp_path / "g.png"), "--fid", str(tmp_path / "a"),
                 "--fid-weights", str(fid_weights()), *FAST])
    out, err = capsys.readouterr()
    assert "a uniform random 4 of its 10 images (seed 0), read at 8x8 (n = 4" in out, out
    assert sizes == {(8, 8)} and len(files) == 4  # 4 of 10 read, all at the samples' size
    assert "biased upward" in err and "2048" in err
    assert out.splitlines()[-2].startswith("IS 1.0") and "(std 0, splits 1; n = 4, ddim 1 steps" in out  # beside it


# The paper's Table 1 NLL: eq. 5's bound in bits/dim, on a folder read as train.py reads its data.
def test_nll_prints_the_bound_of_a_folder_whatever_the_batches(made, tmp_path, capsys):
    rng = np.random.default_rng(0)
    for i in range(5):
        Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(tmp_path / f"{i}.png")
    lines = []
    for batch in ("1", "4"):  # each image's x_t comes from its own generator: the batches do not change the bound
        sample.main([made["plain"], "--nll", str(tmp_path), "--n", "4", "--batch-size", batch])
        out, err = capsys.readouterr()
        lines.append(out.strip().splitlines()[-1])
        assert err.strip().endswith("4/4 images, t 0/50")  # its progress: images, and t counting down
    assert lines[0] == lines[1] and lines[0].startswith("NLL <= ")
    bits = float(lines[0].split()[2])
    assert 1 < bits < 100 and "(n = 4 of 5 in" in lines[0] and "50 terms" in lines[0] and "sigma_t^2 beta," in lines[0]
    sample.main([made["plain"], "--nll", str(tmp_path), "--n", "4", "--variance", "beta_tilde"])
    assert "sigma_t^2 beta_tilde" in capsys.readouterr().out


@pytest.mark.parametrize("argv, words", [
    (["--nll", "nowhere"], "--nll nowhere: not a folder of images"),
    (["--nll", "{top}", "--fid", "{top}"], "--nll writes no samples or picture"),
    (["--nll", "{top}", "--grid", "g.png"], "--nll writes no samples or picture"),
    (["--nll", "{top}", "--sampler", "ddim"], "--sampler, --steps, --eta, --order and --spacing are not used by --nll"),
    (["--nll", "{top}", "--order", "3"], "--sampler, --steps, --eta, --order and --spacing are not used by --nll"),
    (["--nll", "{top}", "--guidance", "2"], "--class and --guidance are not used by --nll"),
    (["--nll", "{top}/empty"], "--nll {top}/empty: no images found"),
])
def test_nll_refuses_what_it_would_ignore_in_one_line(made, capsys, argv, words):
    (made["top"] / "empty").mkdir(exist_ok=True)
    top = str(made["top"])
    refused(capsys, [made["plain"], *[a.format(top=top) for a in argv]], words.format(top=top))


def test_nll_of_a_conditional_checkpoint_needs_its_trained_null_label(made, capsys):
    refused(capsys, [made["no_dropout"], "--nll", str(made["top"])], "--nll (class-less) uses the null label")
