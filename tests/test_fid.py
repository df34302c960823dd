"""fid.py against numbers someone else computed: pytorch-fid 0.3.0's pool3 activations and its FID on MNIST,
the closed form of the Fréchet distance, and the command line's answers to bad input.

The reference numbers and MNIST digits are in tests/fixtures (see its README.md). The tests that run the
network need the FID Inception weights, found as fid.py finds them (FID_WEIGHTS, the cache); without them they
are skipped (see conftest.fid_weights). test_mnist_fid_matches_pytorch_fid is the one slow test (2,000 images
through Inception on CPU).
"""
import hashlib
import io
import json
import math
import os
import re
import signal
import subprocess
import sys
import time
import urllib.error

import numpy as np
import pytest
import scipy.linalg
import torch
from PIL import Image

import data
import fid
from conftest import FIXTURES, ROOT, fid_weights

REFERENCE_FID = json.loads((FIXTURES / 'pytorch_fid_mnist.json').read_text())['fid']


@pytest.fixture(scope='module')
def model():
    return fid.load_inception(fid_weights())


@pytest.fixture(scope='module')
def mnist():
    with np.load(FIXTURES / 'mnist_1000.npz') as f:
        return f['x_train'], f['x_test']


def random_images():
    return np.random.default_rng(0).integers(0, 256, size=(8, 32, 32, 3), dtype=np.uint8)


def write_pngs(folder, images):
    """uint8 [N, H, W] (grey, saved as RGB with the grey replicated) or [N, H, W, 3] -> folder/00000.png ..."""
    folder.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(images):
        rgb = np.repeat(image[..., None], 3, axis=2) if image.ndim == 2 else image
        Image.fromarray(rgb, 'RGB').save(folder / f'{i:05d}.png')
    return folder


def run_cli(*args, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != 'FID_WEIGHTS'}
    env['XDG_CACHE_HOME'] = str(tmp_path / 'cli-cache')  # never the user's cache, never a download
    return subprocess.run([sys.executable, str(ROOT / 'fid.py'), *map(str, args)], capture_output=True,
                          text=True, env=env, cwd=tmp_path, timeout=900)


def fid_value(result):
    assert result.returncode == 0, result.stderr
    line = next(line for line in result.stdout.splitlines() if line.startswith('FID: '))
    return float(line.split()[1])


# --- parity with pytorch-fid ------------------------------------------------------------------------------

@pytest.mark.parametrize('name', ['mnist', 'random'])
def test_activations_match_pytorch_fid(model, mnist, name):
    images = mnist[1][:8] if name == 'mnist' else random_images()  # grey [8, 28, 28] / RGB [8, 32, 32, 3]
    file = {'mnist': 'act_mnist_test_0_8_rgb28.npy', 'random': 'act_random_uint8_seed0_8x32x32x3.npy'}[name]
    reference = np.load(FIXTURES / file)
    acts = fid.activations(images, model)
    assert acts.shape == (8, 2048)
    assert np.abs(acts - reference).max() < 1e-4


def test_png_folder_matches_pytorch_fid(model, mnist, tmp_path):
    # Recursive search, sorted paths, PNG decoding; files without an image extension are skipped.
    write_pngs(tmp_path / 'a', mnist[1][:8])
    write_pngs(tmp_path / 'a' / 'sub', random_images())
    (tmp_path / 'a' / 'notes.txt').write_text('not an image')
    acts = fid.folder_activations(tmp_path / 'a', model, batch_size=5)
    reference = np.concatenate([np.load(FIXTURES / 'act_mnist_test_0_8_rgb28.npy'),
                                np.load(FIXTURES / 'act_random_uint8_seed0_8x32x32x3.npy')])
    assert np.abs(acts - reference).max() < 1e-4
    some = sorted(np.random.default_rng(fid.SUBSET_SEED).permutation(16)[:3])  # n: a seeded random draw
    assert np.array_equal(fid.folder_activations(tmp_path / 'a', model, n=3), acts[some])


def test_float_and_grey_tensors_equal_their_uint8_images(model, mnist):
    # The toolkit's float [-1, 1] images are quantised like a PNG writer, so both give the same numbers.
    grey = mnist[1][:3]
    as_uint8 = fid.activations(grey, model)
    as_float = torch.from_numpy(grey)[:, None].float() / 127.5 - 1             # [3, 1, 28, 28] in [-1, 1]
    assert np.array_equal(fid.activations(as_float, model), as_uint8)
    assert np.array_equal(fid.activations(as_float.repeat(1, 3, 1, 1), model, batch_size=2), as_uint8)


def test_mnist_fid_matches_pytorch_fid(mnist, tmp_path):
    train, test = write_pngs(tmp_path / 'train', mnist[0]), write_pngs(tmp_path / 'test', mnist[1])
    start = time.perf_counter()
    result = run_cli(train, test, '--weights', fid_weights(), '--is', tmp_path=tmp_path)
    seconds = time.perf_counter() - start
    value = fid_value(result)
    print(f'FID {value} (pytorch-fid: {REFERENCE_FID}); 2 x 1000 PNGs in {seconds:.0f} s end to end')
    assert abs(value - REFERENCE_FID) < 0.01
    assert '1000 from' in result.stdout
    # The IS of the same pass: torch-fidelity's 1.008489 (std 0.000247) for x_test[:1000]. Ours is 1.008448 (std
    # 0.000242): its resize and input scaling are TF's, ours pytorch-fid's (test_logits_match_torch_fidelity).
    line = next(line for line in result.stdout.splitlines() if line.startswith('IS: ') and line.endswith(f'{test})'))
    reference = json.loads((FIXTURES / 'is_torch_fidelity.json').read_text())['mnist_test_1000_rgb28']
    assert abs(float(line.split()[1]) - reference['inception_score_mean']) < 1e-4 and 'splits 10; n = 1000' in line


# --- the Inception Score: torch-fidelity 0.4.0's logits and formula ------------------------------------------

def tf1_resize(x, size=299):
    """torch-fidelity's resize of float [N, C, H, W]: TF 1.x's bilinear without half-pixel centres (output pixel i
    reads input i * in / out, the last row and column repeated beyond the edge), along W, then along H."""
    def sources(n_in):
        src = torch.arange(size, dtype=torch.float32) * (n_in / size)
        low = src.long()
        return low, (low + 1).clamp(max=n_in - 1), src - low
    (y0, y1, dy), (x0, x1, dx) = sources(x.shape[2]), sources(x.shape[3])
    rows = x[..., x0] + (x[..., x1] - x[..., x0]) * dx
    return rows[:, :, y0] + (rows[:, :, y1] - rows[:, :, y0]) * dy[:, None]


def test_logits_match_torch_fidelity(model, mnist):
    # Fed torch-fidelity's input (its resize on 0..255, then the graph's own (x - 128) / 128, which is x / 256 in
    # FIDInception's [0, 1] input), the network and its fc give torch-fidelity's logits, with and without the bias.
    with np.load(FIXTURES / 'is_torch_fidelity.npz') as f:
        ref = dict(f)
    images = {'smooth299': ref['smooth299_images'], 'mnist28': np.repeat(mnist[1][:8, ..., None], 3, axis=3)}
    for name, uint8 in images.items():
        x = torch.from_numpy(uint8).permute(0, 3, 1, 2).float()
        with torch.inference_mode():
            logits = model.logits(model((x if name == 'smooth299' else tf1_resize(x)) / 256))
        assert np.abs(logits.numpy() - ref[f'{name}_logits_unbiased']).max() < 1e-5
        assert np.abs((logits + model.fc.bias).numpy() - ref[f'{name}_logits']).max() < 1e-5
    # fid.py's own input is pytorch-fid's, for its FID: 2 x / 255 - 1 moves the logits of the 299x299 images (no
    # resize) by up to 3.5e-3 (of logits up to 1.1), and pytorch-fid's half-pixel bilinear resize those of 28x28
    # MNIST by up to 0.19 (of logits up to 1; their softmaxes by 2.3e-4). 1000 digits: an IS 4e-5 below theirs.
    for name, most in (('smooth299', 5e-3), ('mnist28', 0.25)):
        logits = model.logits(fid.activations(images[name], model)).numpy()
        assert most / 5 < np.abs(logits - ref[f'{name}_logits_unbiased']).max() < most


def test_inception_score_identities():
    same = np.tile(np.random.default_rng(0).normal(size=(1, 1008)), (20, 1))
    assert fid.inception_score(same) == (pytest.approx(1, abs=1e-12), pytest.approx(0, abs=1e-12), 10)
    confident = np.eye(10, 1008) * 60  # image i is class i, with probability 1 - 1007 e^-60
    assert fid.inception_score(confident, 1)[:2] == (pytest.approx(10), 0)
    assert fid.inception_score(confident)[:2] == (pytest.approx(1), pytest.approx(0, abs=1e-12))  # 10 parts of 1
    # torch-fidelity's parts of 10 in 3: [0, 3), [3, 6), [6, 10), scoring 3, 3 and 4; np.std's ddof 0: sqrt(2) / 3
    assert fid.inception_score(confident, 3) == (pytest.approx(10 / 3), pytest.approx(math.sqrt(2) / 3), 3)
    # By hand: p(y|x) (0.9, 0.1) and (0.5, 0.5), so p(y) = (0.7, 0.3); fewer than 10 images are one part
    kl = [0.9 * math.log(0.9 / 0.7) + 0.1 * math.log(0.1 / 0.3), 0.5 * math.log(0.5 / 0.7) + 0.5 * math.log(0.5 / 0.3)]
    assert fid.inception_score(np.log([[0.9, 0.1], [0.5, 0.5]])) == (pytest.approx(math.exp(sum(kl) / 2)), 0, 1)
    with pytest.raises(fid.FIDError, match='10 splits needs at least 10 images, not 5'):
        fid.inception_score(same[:5], 10)


def test_is_flag_scores_each_folder_from_the_fids_pass(model, mnist, tmp_path, monkeypatch, capsys):
    a, b = write_pngs(tmp_path / 'a', mnist[1][:3]), write_pngs(tmp_path / 'b', mnist[1][3:5])
    monkeypatch.setattr(fid, 'load_inception', lambda *args: model)
    monkeypatch.setattr(fid, 'frechet_distance', lambda *stats: 1.5)  # a 2048-d root of 2 images': a minute
    passes = []
    monkeypatch.setattr(fid, 'run_model', lambda *args, run=fid.run_model: passes.append(1) or run(*args))
    assert fid.main([str(a), '--is']) == 0  # one folder: its IS alone
    out = capsys.readouterr().out.splitlines()
    mean, std, splits = fid.inception_score(model.logits(fid.folder_activations(a, model)))
    assert out == [f'IS: {mean}  (std {std:.4g}, splits 1; n = 3 from {a})'] and len(passes) == 2
    assert fid.main([str(a), str(b), '--is']) == 0  # two: each one's IS, then the FID, one pass each
    out = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in out] == ['IS:', 'IS:', 'FID:'] and out[1].endswith(f'n = 2 from {b})')
    assert len(passes) == 4


# --- the Fréchet distance ---------------------------------------------------------------------------------

@pytest.mark.parametrize('delay', [5.0])  # while the network runs (or still loading)
def test_ctrl_c_is_one_line_and_saves_nothing(mnist, tmp_path, delay):
    folder = write_pngs(tmp_path / 'digits', mnist[0][:300])
    # (SIG_DFL first: a shell's background job inherits SIGINT ignored, and Python then keeps ignoring it)
    proc = subprocess.Popen([sys.executable, ROOT / 'fid.py', folder, '--save-stats', tmp_path / 's.npz'],
                            stderr=subprocess.PIPE, text=True, env={**os.environ, 'FID_WEIGHTS': str(fid_weights())},
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    time.sleep(delay)
    proc.send_signal(signal.SIGINT)
    err = proc.communicate(timeout=120)[1]
    assert proc.returncode == 130 and err.strip() == 'fid.py: interrupted', err
    assert not (tmp_path / 's.npz').exists()


def test_distance_of_a_set_to_itself_is_zero():
    mu, sigma = fid.statistics(np.random.default_rng(1).normal(size=(500, 32)))
    assert abs(fid.frechet_distance(mu, sigma, mu, sigma)) < 1e-6


def test_rounding_below_zero_reads_zero():
    # 10 samples in 64 dimensions: a singular covariance, whose square root scipy gets a little wrong.
    mu, sigma = fid.statistics(np.random.default_rng(0).normal(size=(10, 64)))
    unclamped = 2 * np.trace(sigma) - 2 * np.trace(scipy.linalg.sqrtm(sigma @ sigma).real)
    assert -1e-4 < unclamped < 0                       # as for a folder of Inception features against itself
    assert fid.frechet_distance(mu, sigma, mu, sigma) == 0.0


def test_distance_between_diagonal_gaussians_has_its_closed_form():
    rng = np.random.default_rng(2)
    mu1, mu2, var1, var2 = rng.normal(size=16), rng.normal(size=16), rng.uniform(0.1, 2, 16), rng.uniform(0.1, 2, 16)
    closed_form = np.sum((mu1 - mu2) ** 2) + np.sum(var1 + var2 - 2 * np.sqrt(var1 * var2))
    assert fid.frechet_distance(mu1, np.diag(var1), mu2, np.diag(var2)) == pytest.approx(closed_form, rel=1e-9)


def test_statistics_are_float64_mean_and_unbiased_covariance():
    acts = np.random.default_rng(3).normal(size=(10, 4)).astype(np.float32)
    mu, sigma = fid.statistics(acts)
    assert mu.dtype == sigma.dtype == np.float64
    assert np.allclose(sigma, (acts - acts.mean(0)).T.astype(np.float64) @ (acts - acts.mean(0)) / 9)


def test_distance_rejects_statistics_of_different_sizes():
    with pytest.raises(fid.FIDError, match='do not match'):
        fid.frechet_distance(np.zeros(4), np.eye(4), np.zeros(3), np.eye(3))


def test_stats_files_round_trip(model, mnist, tmp_path):
    folder = write_pngs(tmp_path / 'a', mnist[1][:8])
    result = run_cli(folder, '--save-stats', tmp_path / 'a.npz', '--weights', fid_weights(), tmp_path=tmp_path)
    assert result.returncode == 0, result.stderr
    with np.load(tmp_path / 'a.npz') as f:                                  # as pytorch-fid reads them
        saved = f['mu'][:], f['sigma'][:]
    expected = fid.statistics(fid.folder_activations(folder, model))
    assert saved[0].shape == (2048,) and saved[1].shape == (2048, 2048)
    assert np.allclose(saved[0], expected[0], rtol=0, atol=1e-12) and np.allclose(saved[1], expected[1], rtol=0, atol=1e-12)
    assert all(np.array_equal(a, b) for a, b in zip(fid.reference_stats(tmp_path / 'a.npz', model), saved))
    # Two stats files through the command line give the API's distance (small ones: a 2048-d square
    # root of a singular product takes scipy a minute on 2 cores).
    rng = np.random.default_rng(4)
    stats = [fid.statistics(rng.normal(size=(50, 16)) + shift) for shift in (0, 0.5)]
    for name, (mu, sigma) in zip('bc', stats):
        fid.save_stats(tmp_path / f'{name}.npz', mu, sigma)
    value = fid_value(run_cli(tmp_path / 'b.npz', tmp_path / 'c.npz', tmp_path=tmp_path))
    assert value == pytest.approx(fid.frechet_distance(*stats[0], *stats[1]), rel=1e-12)


def test_samples_in_memory_give_the_statistics_of_their_pngs(model, mnist, tmp_path, monkeypatch):
    # fid_from_samples on float [-1, 1] samples sees exactly what the folder path sees in their PNGs.
    a, b = write_pngs(tmp_path / 'a', mnist[1][:6]), write_pngs(tmp_path / 'b', mnist[0][:8])
    samples = torch.from_numpy(mnist[1][:8])[:, None].float() / 127.5 - 1
    calls = []
    monkeypatch.setattr(fid, 'frechet_distance', lambda *stats: calls.append(stats) or 1.5)
    assert fid.fid_from_samples(samples, b, n=6, model=model) == 1.5
    expected = [*fid.statistics(fid.folder_activations(a, model)),
                *fid.statistics(fid.folder_activations(b, model, n=6))]
    assert all(np.array_equal(got, want) for got, want in zip(calls[0], expected))


def test_reference_stats_are_cached_until_the_folder_changes(model, mnist, tmp_path, monkeypatch):
    monkeypatch.setenv('XDG_CACHE_HOME', str(tmp_path / 'cache'))
    folder = write_pngs(tmp_path / 'ref', mnist[1][:4])
    mu, sigma = fid.reference_stats(folder, model)
    monkeypatch.setattr(fid, 'folder_activations', lambda *a, **k: pytest.fail('the cache was not used'))
    mu2, sigma2 = fid.reference_stats(folder, model)
    assert np.array_equal(mu, mu2) and np.array_equal(sigma, sigma2)
    write_pngs(tmp_path / 'ref' / 'more', mnist[1][4:5])
    monkeypatch.setattr(fid, 'folder_activations', lambda *a, **k: (_ for _ in ()).throw(RuntimeError('recomputed')))
    with pytest.raises(RuntimeError, match='recomputed'):
        fid.reference_stats(folder, model)


def test_the_statistics_cache_sees_a_changed_file_and_survives_damage(mnist, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv('XDG_CACHE_HOME', str(tmp_path / 'cache'))
    folder, calls = write_pngs(tmp_path / 'ref', mnist[1][:4]), []
    monkeypatch.setattr(fid, 'folder_activations',  # stands in for Inception: new activations at every call
                        lambda *a, **k: calls.append(1) or np.random.default_rng(len(calls)).normal(size=(4, 2048)))
    fid.reference_stats(folder, None)
    image = folder / '00000.png'
    os.utime(image, ns=(image.stat().st_atime_ns, image.stat().st_mtime_ns + 1))  # rewritten, as the mtime says
    fid.reference_stats(folder, None)
    cached, = (tmp_path / 'cache' / 'ddpm-toolkit' / 'fid-stats').glob('*.npz')  # the earlier state's is deleted
    assert len(calls) == 2
    cached.write_bytes(b'damaged')
    mu, _ = fid.reference_stats(folder, None)
    assert len(calls) == 3 and 'cached statistics are damaged' in capsys.readouterr().err
    assert np.array_equal(fid.load_stats(cached)[0], mu)  # repaired
    fid.save_stats(cached, np.zeros(10), np.eye(10), 4)  # readable, but not the network's 2048-d: not used
    fid.reference_stats(folder, None)
    assert len(calls) == 4 and 'not 2048-d' in capsys.readouterr().err
    monkeypatch.setenv('XDG_CACHE_HOME', str(image))  # a file where the cache folder would be: used without it
    assert len(fid.reference_stats(folder, None)) == 2 and len(calls) == 5
    assert 'not cached' in capsys.readouterr().err


def test_n_images_of_class_folders_are_a_seeded_random_draw_not_the_first_class(tmp_path, monkeypatch, capsys):
    # MNIST exported by digit: the first 20 sorted names are all zeros, and scored 228 where a random 20 scored 149.
    for digit in range(10):
        write_pngs(tmp_path / 'digits' / str(digit), np.full((10, 4, 4), digit * 25, np.uint8))
    files, skipped = fid.readable_files(tmp_path / 'digits', n=20)
    assert len(files) == 20 and files == sorted(files) and not skipped
    assert len({f.parent.name for f in files}) >= 6  # 20 of 100 at random: most classes, not one
    assert fid.readable_files(tmp_path / 'digits', n=20) == (files, [])  # the same draw on every run
    assert fid.readable_files(tmp_path / 'digits')[0] == fid.image_files(tmp_path / 'digits')  # no n: all, sorted
    assert fid.subset_note(tmp_path / 'digits', 20) == 'a uniform random 20 of its 100 images (seed 0)'
    assert fid.subset_note(tmp_path / 'digits', None) == 'all 100 images'
    seen = []  # the statistics of a reference folder are those of the drawn files
    monkeypatch.setattr(fid, 'run_model', lambda model, make_batch, n, *a: seen.append(make_batch(0, n)) or
                        np.random.default_rng(0).normal(size=(n, 2048)))
    fid.reference_stats(tmp_path / 'digits', None, n=20)
    assert sorted(seen[0][:, 0, 0, 0].tolist()) == sorted(int(f.parent.name) * 25 for f in files)


def test_size_reads_a_reference_folder_as_training_reads_its_data(tmp_path, monkeypatch):
    # 64x48 pictures scored against 16x16 samples must be read at 16x16 (shorter side, centre crop), not stretched.
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)).save(tmp_path / f'{i}.png')
    Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)).save(tmp_path / '3.jpg', quality=90)
    seen = []
    monkeypatch.setattr(fid, 'run_model', lambda model, make_batch, n, *a: seen.append(make_batch(0, n)) or
                        np.random.default_rng(0).normal(size=(n, 2048)))
    fid.folder_activations(tmp_path, None, size=(16, 16))
    expected = [data.read_image(str(p), (16, 16)) for p in sorted(tmp_path.iterdir())]
    assert np.array_equal(seen[0].numpy(), np.stack(expected))
    fid.reference_stats(tmp_path, None, size=(16, 16))
    fid.reference_stats(tmp_path, None)  # a different size: not the cached statistics
    fid.reference_stats(tmp_path, None, size=(16, 16))  # the same again: cached
    assert len(seen) == 3 and seen[2].shape == (4, 48, 64, 3)


def test_the_statistics_cache_is_keyed_by_the_weights(tmp_path, monkeypatch):
    # Statistics cached with the real weights were used with --fid-weights other.pth: 40.89 where 36.50 was right.
    folder, calls = write_pngs(tmp_path / 'ref', random_images()[:3]), []
    monkeypatch.setattr(fid, 'folder_activations', lambda *a, **k: calls.append(1) or
                        np.random.default_rng(len(calls)).normal(size=(3, 2048)))
    real, other = (type('Net', (), {'weights_id': name})() for name in ('real 95628359 1', 'other.pth 1000 2'))
    a = fid.reference_stats(folder, real)[0]
    assert np.array_equal(fid.reference_stats(folder, real)[0], a) and len(calls) == 1
    assert not np.array_equal(fid.reference_stats(folder, other)[0], a) and len(calls) == 2
    assert np.array_equal(fid.reference_stats(folder, real)[0], a) and len(calls) == 2  # both kept


def test_loaded_weights_name_their_file_for_the_cache(model):
    path, stat = fid_weights(), os.stat(fid_weights())
    assert model.weights_id == f'{path.resolve()} {stat.st_size} {stat.st_mtime_ns}'


def test_statistics_files_by_their_name_folders_by_theirs(mnist, tmp_path, monkeypatch, capsys):
    folder = write_pngs(tmp_path / 'looks.npz', mnist[1][:3])  # a folder, whatever its name
    assert [p.name for p in fid.image_files(folder)] == ['00000.png', '00001.png', '00002.png']
    stats = tmp_path / 'REF.NPZ'
    with open(stats, 'wb') as f:
        np.savez(f, mu=np.zeros(2048), sigma=np.eye(2048))  # pytorch-fid's keys only: no n
    assert fid.main([str(stats), '--save-stats', str(tmp_path / 'copy.npz')]) == 0
    assert 'saved statistics of an unknown number of images' in capsys.readouterr().out
    assert fid.reference_stats(stats, None)[0].shape == (2048,)
    monkeypatch.setattr(np, 'savez', lambda f, **arrays: (_ for _ in ()).throw(OSError(28, 'No space left on device')))
    assert fid.main([str(stats), '--save-stats', str(tmp_path / 'full.npz')]) == 2  # names the file, leaves none
    assert f"No space left on device: '{tmp_path / 'full.npz'}'" in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path)) == ['REF.NPZ', 'copy.npz', 'looks.npz']
    with pytest.raises(fid.FIDError, match='neither a folder of images nor a .npz'):
        fid.reference_stats(folder / '00000.png', None)
    seen = []  # n=None scores every sample
    monkeypatch.setattr(fid, 'activations', lambda x, *a, **k: seen.append(len(x)) or np.zeros((len(x), 3)))
    monkeypatch.setattr(fid, 'reference_stats', lambda ref, model, n=None, **k: seen.append(n) or (np.zeros(3), np.eye(3)))
    assert fid.fid_from_samples(torch.zeros(5, 3, 8, 8), stats, None, model=object()) == 3.0 and seen == [5, 5]


# --- where the weights come from (never the network here) ---------------------------------------------

def test_weights_resolution_order(tmp_path, monkeypatch):
    monkeypatch.setenv('XDG_CACHE_HOME', str(tmp_path / 'cache'))
    monkeypatch.setenv('FID_WEIGHTS', str(tmp_path / 'env.pth'))
    other, env = tmp_path / 'other.pth', tmp_path / 'env.pth'
    other.write_bytes(b'')
    env.write_bytes(b'')
    assert fid.find_weights(other) == other                                  # the explicit path wins
    assert fid.find_weights() == env                                         # then $FID_WEIGHTS
    monkeypatch.delenv('FID_WEIGHTS')
    cached = tmp_path / 'cache' / 'ddpm-toolkit' / fid.WEIGHTS_NAME
    with pytest.raises(fid.FIDError, match='FID_WEIGHTS'):
        fid.find_weights(download=False)                                     # tests never download
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b'')
    assert fid.find_weights() == cached                                      # then the cache file
    with pytest.raises(fid.FIDError, match='no such file'):
        fid.find_weights(tmp_path / 'missing.pth')
    with pytest.raises(fid.FIDError, match='--weights : no such file'):      # an empty --weights is a mistake,
        fid.find_weights('')
    monkeypatch.setenv('FID_WEIGHTS', '')                                    # an empty variable is unset
    assert fid.find_weights() == cached


class FakeResponse(io.BytesIO):
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_download_is_verified_before_it_is_used(tmp_path, monkeypatch):
    monkeypatch.setenv('XDG_CACHE_HOME', str(tmp_path / 'cache'))
    monkeypatch.delenv('FID_WEIGHTS', raising=False)
    folder = tmp_path / 'cache' / 'ddpm-toolkit'
    monkeypatch.setattr(fid.urllib.request, 'urlopen', lambda *a, **k: FakeResponse(b'not the weights'))
    with pytest.raises(fid.FIDError, match='sha256'):
        fid.find_weights()
    assert list(folder.iterdir()) == []                                      # the bad download is gone
    monkeypatch.setattr(fid, 'WEIGHTS_SHA256', hashlib.sha256(b'not the weights').hexdigest())
    assert fid.find_weights().read_bytes() == b'not the weights'             # renamed into place


def test_no_weights_and_no_network_says_where_to_put_them(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv('XDG_CACHE_HOME', str(tmp_path / 'cache'))
    monkeypatch.delenv('FID_WEIGHTS', raising=False)

    def offline(*args, **kwargs):
        raise urllib.error.URLError('no network')
    monkeypatch.setattr(fid.urllib.request, 'urlopen', offline)
    with pytest.raises(fid.FIDError) as error:
        fid.find_weights()
    message = str(error.value)
    assert 'FID_WEIGHTS' in message and '--weights' in message and str(tmp_path / 'cache') in message
    assert capsys.readouterr().err == ''                                      # no 'downloading' line before it


@pytest.mark.parametrize('make, reason', [
    (lambda p: p.write_bytes(b''), 'empty or cut short'),
    (lambda p: p.write_bytes(b'hello'), 'damaged, or not a file torch.save wrote'),
    (lambda p: (torch.save({'w': torch.zeros(1000)}, p), p.write_bytes(p.read_bytes()[:2000])), 'empty or cut short'),
    (lambda p: (torch.save({'w': torch.zeros(100000)}, p), p.write_bytes(p.read_bytes()[:5000])), 'empty or cut short'),
    (lambda p: torch.save(torch.nn.Linear(2, 2), p), 'it holds Python objects'),
    (lambda p: torch.save({'w': torch.zeros(1)}, p), 'Unexpected key(s) in state_dict: "w"'),
])
def test_unusable_weights_say_what_is_wrong_with_them(tmp_path, make, reason):
    make(tmp_path / 'w.pth')
    with pytest.raises(fid.FIDError, match=re.escape(f"w.pth: not FID Inception weights in pytorch-fid's layout "
                                                     f"({reason}")):
        fid.load_inception(tmp_path / 'w.pth')


# --- bad input: one line, exit status 2 (FIDError in the library), before any work -----------------------

def assert_user_error(result, *words):
    assert result.returncode == 2, (result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and 'Traceback' not in result.stderr, result.stderr
    for word in words:
        assert str(word) in lines[0], lines[0]


@pytest.fixture(scope='module')
def bad(tmp_path_factory):
    """A folder of inputs for the table below: small image folders and statistics files, good and bad."""
    d = tmp_path_factory.mktemp('bad')
    write_pngs(d / 'imgs', random_images()[:3])
    write_pngs(d / 'one', random_images()[:1])
    write_pngs(d / 'fifo', random_images()[:1])
    for name in ('truncated', 'garbled'):  # two good images, then a bad last one
        png = write_pngs(d / name, random_images()[:3]) / '00002.png'
        png.write_bytes(png.read_bytes()[:1500] if name == 'truncated' else b'this is not a PNG')
    os.mkfifo(d / 'fifo' / 'x.png')                        # reading it would block: not an image file
    os.mkfifo(d / 'fifo.npz')
    for folder in ('empty', 'dir.npz', 'ro'):
        (d / folder).mkdir()
    (d / 'ro').chmod(0o555)
    (d / 'note.txt').write_text('not statistics')
    (d / 'text.npz').write_text('not statistics')
    np.savez(d / 'objects.npz', mu=np.array([{'a': 1}], dtype=object), sigma=np.eye(1))
    (d / 'empty.npz').write_bytes(b'')
    with open(d / 'npy.npz', 'wb') as f:
        np.save(f, np.zeros(4))
    np.savez(d / 'nokeys.npz', mean=np.zeros(4))
    np.savez(d / 'badn.npz', mu=np.zeros(4), sigma=np.eye(4), n=np.arange(2))
    np.savez(d / 'negn.npz', mu=np.zeros(4), sigma=np.eye(4), n=-3)
    np.savez(d / 'floatn.npz', mu=np.zeros(4), sigma=np.eye(4), n=2.5)
    np.savez(d / 'arrayn.npz', mu=np.zeros(4), sigma=np.eye(4), n=[5])
    inf, nonsym = np.eye(4), np.eye(4) + np.triu(np.ones((4, 4)), 1)
    inf[2, 2] = np.inf
    stats = {'good': (np.zeros(4), np.eye(4)), 'good3': (np.zeros(3), np.eye(3)), 'd0': (np.zeros(0), np.eye(0)),
             'mu2d': (np.zeros((2, 2)), np.eye(4)), 'sigma43': (np.zeros(4), np.ones((4, 3))),
             'sigma5': (np.zeros(4), np.eye(5)), 'nan': (np.full(4, np.nan), np.eye(4)), 'inf': (np.zeros(4), inf),
             'nonsym': (np.zeros(4), nonsym), 'negvar': (np.zeros(4), -np.eye(4)),
             'complex': (np.zeros(4, complex), np.eye(4, dtype=complex)), 'huge': (np.full(4, 1e300), np.eye(4) * 1e300)}
    for name, (mu, sigma) in stats.items():
        np.savez(d / f'{name}.npz', mu=mu, sigma=sigma)
    return d


STATS = ['good.npz', 'good3.npz']  # a valid pair of a different dimension: only the flag under test is wrong
BAD_COMMAND_LINES = [  # (arguments, run in the folder `bad`; words the one line must hold)
    ([], 'PATH'),
    ([*STATS, '--bogus'], '--bogus'),
    (['imgs'], 'two PATHs'),
    (['imgs', 'one', 'empty'], 'two PATHs'),
    (['imgs', 'one', 'empty', '--is'], 'two PATHs'),
    (['good.npz', '--is'], '--is reads the images of a folder'),
    (['imgs', 'one', '--save-stats', 'out.npz'], 'exactly one'),
    (['nowhere', 'imgs'], 'nowhere'),
    (['note.txt', 'imgs'], 'note.txt'),
    (['empty', 'imgs'], 'empty: 0 image file'),
    (['one', 'imgs'], 'one: 1 image file'),
    (['fifo', 'imgs'], 'fifo: 1 image file'),                 # the FIFO x.png is skipped, not read
    (['fifo.npz', 'good.npz'], 'fifo.npz: not a regular file'),
    (['imgs', '--save-stats', 'out.npz', '--n', '5'], 'n = 5'),
    ([*STATS, '--n', '5'], '--n reads the images of a folder'),
    (['nokeys.npz', 'good.npz'], 'nokeys.npz: no mu or sigma'),
    (['empty.npz', 'good.npz'], 'empty.npz: not a readable'),
    (['text.npz', 'good.npz'], 'text.npz: not a readable .npz of statistics (not a .npz archive)'),
    (['objects.npz', 'good.npz'], 'objects.npz: not a readable .npz of statistics (object arrays, not numbers)'),
    (['npy.npz', 'good.npz'], 'npy.npz: not a readable .npz of statistics (not a .npz archive)'),
    (['badn.npz', 'good.npz'], 'badn.npz: not a readable'),
    (['good.npz', 'negn.npz'], 'negn.npz: not a readable .npz of statistics (n = -3'),
    (['good.npz', 'floatn.npz'], 'floatn.npz: not a readable .npz of statistics (n = 2.5'),
    (['good.npz', 'arrayn.npz'], 'arrayn.npz: not a readable .npz of statistics (n = array([5])'),
    (['imgs', 'truncated', '--n', '3'], 'truncated: 2 readable image files, fewer than 3 ('),  # before any pass
    (['imgs', 'garbled', '--n', '3'], 'garbled/00002.png: cannot read'),
    ([*STATS, '--size', '32'], '--size reads the images of a folder'),
    *[([*STATS, '--size', value], 'argument --size') for value in ('0', '32x', 'x32', '8x8x8', '-8', 'big')],
    (['mu2d.npz', 'good.npz'], 'mu2d.npz: mu and sigma are not [D] and [D, D]'),
    (['sigma43.npz', 'good.npz'], 'sigma43.npz: mu and sigma are not'),
    (['sigma5.npz', 'good.npz'], 'sigma5.npz: mu and sigma are not'),
    (['d0.npz', 'good.npz'], 'd0.npz: mu and sigma are not'),
    (['good.npz', 'nan.npz'], 'nan.npz: NaN'),
    (['good.npz', 'inf.npz'], 'inf.npz: NaN or infinite'),
    (['nonsym.npz', 'good.npz'], 'nonsym.npz: sigma is not symmetric'),
    (['negvar.npz', 'good.npz'], 'negvar.npz: a negative variance'),
    (['complex.npz', 'good.npz'], 'complex.npz: mu and sigma must hold real numbers'),
    (['huge.npz', 'good.npz'], 'too large for float64'),
    (STATS, '3-d'),
    (['imgs', 'good.npz'], '4-d'),                            # a folder's statistics are 2048-d
    (['imgs', '--save-stats', 'missing/out.npz'], 'cannot write in missing'),
    (['imgs', '--save-stats', 'note.txt/out.npz'], 'cannot write in note.txt'),
    (['imgs', '--save-stats', 'dir.npz'], '--save-stats dir.npz'),
    (['imgs', '--save-stats', 'fifo.npz'], '--save-stats fifo.npz'),
    (['imgs', '--save-stats', 'out.txt'], 'ends in .npz'),
    pytest.param(['imgs', '--save-stats', 'ro/out.npz'], 'cannot write in ro', id='read-only folder',
                 marks=pytest.mark.skipif(os.geteuid() == 0, reason='root writes into read-only folders')),
    *[([*STATS, flag, value], f'argument {flag}') for flag, values in [('--n', ['0', '1', '-3', '2.5', 'all']),
                                                                       ('--batch-size', ['0', '-1', '1.5']),
                                                                       ('--workers', ['0', 'x'])] for value in values],
    ([*STATS, '--device', 'tpu'], '--device tpu'),
    ([*STATS, '--device', ''], '--device : not a device'),
    ([*STATS, '--device', 'cuda:99'], '--device cuda:99'),
]


@pytest.mark.filterwarnings('error')  # a warning would be a second line on stderr
@pytest.mark.parametrize('args, words', BAD_COMMAND_LINES)
def test_cli_refuses_bad_input_in_one_line(bad, args, words, monkeypatch, capsys):
    # In-process for speed; test_cli_garbage_weights checks the exit status of the real process.
    monkeypatch.chdir(bad)
    monkeypatch.setattr(fid, 'load_inception', lambda *a, **k: pytest.fail('loaded the network before the checks'))
    files = sorted(bad.rglob('*'))
    handler = signal.signal(signal.SIGALRM, lambda *a: pytest.fail('no answer in 20 s: reading a FIFO?'))
    signal.alarm(20)
    try:
        status = fid.main(args)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, handler)
    out, err = capsys.readouterr()
    assert status == 2 and len(err.splitlines()) == 1 and 'Traceback' not in out + err, (status, out, err)
    assert err.startswith('fid.py: error: ') and words in err, err
    assert sorted(bad.rglob('*')) == files                                  # nothing written


def test_library_refuses_bad_input(bad):
    not_psd = [[1, 2], [2, 1]]  # eigenvalues 3 and -1: symmetric, a positive diagonal, and no covariance
    cases = [(lambda: fid.reference_stats(bad / 'good.npz', model=None), 'not 2048-d'),  # train.py's --fid-ref check
             (lambda: fid.load_stats(bad / 'fifo.npz'), 'not a regular file'),
             (lambda: fid.reference_stats(bad / 'truncated', None, n=3), '00002.png: cannot read'),  # before the passes
             (lambda: fid.readable_files(bad / 'imgs', n=-1), 'n = -1'),
             (lambda: fid.readable_files(bad / 'imgs', n=4), 'fewer than n = 4'),
             (lambda: fid.image_files(bad / 'note.txt'), 'note.txt: not a folder'),
             (lambda: fid.to_uint8(torch.full((2, 3, 8, 8), float('nan'))), 'NaN'),  # not black pixels, a finite FID
             (lambda: fid.fid_from_samples(torch.zeros(4, 3, 8, 8), bad / 'good.npz', 0, model=object()), 'n = 0'),
             (lambda: fid.activations(np.zeros((2, 8, 8, 3), np.uint8), None, 0, device='cpu'), 'batch_size = 0'),
             (lambda: fid.frechet_distance(np.zeros(2), np.full((2, 2), np.nan), np.zeros(2), np.eye(2)), 'NaN'),
             (lambda: fid.frechet_distance(np.zeros(2), [[1, 1], [0, 1]], np.zeros(2), np.eye(2)), 'symmetric'),
             (lambda: fid.frechet_distance(np.zeros(2), not_psd, np.zeros(2), not_psd), 'positive semi-definite'),
             (lambda: fid.frechet_distance(np.zeros(2), np.eye(2) * (1 + 5j), np.zeros(2), np.eye(2)), 'complex')]

    for call, words in cases:
        with pytest.raises(fid.FIDError, match=words):
            call()


def test_cli_skips_and_names_every_unreadable_image_in_one_run(mnist, tmp_path):
    # train.py's rule: skip, count and name them all, not one refusal a run. One fails PIL's check, one its decoding.
    folder = write_pngs(tmp_path / 'a', mnist[1][:3])
    (folder / 'broken.png').write_bytes(b'this is not a PNG')
    jpeg = io.BytesIO()
    Image.new('RGB', (64, 64), 'red').save(jpeg, 'JPEG')
    (folder / 'cut.jpg').write_bytes(jpeg.getvalue()[:300])  # a header that passes, and no picture
    other = write_pngs(tmp_path / 'b', mnist[1][3:5])
    result = run_cli(folder, other, '--weights', fid_weights(), tmp_path=tmp_path)
    assert fid_value(result) > 0 and 'n = 3 from' in result.stdout
    assert 'skipped 2 unreadable image file(s)' in result.stderr and 'broken.png: cannot read' in result.stderr
    assert 'cut.jpg: cannot read' in result.stderr
    assert 'FID of 2 images is biased upward' in result.stderr  # few images: said, not only computed


def test_cli_garbage_weights(mnist, tmp_path):
    a, b = write_pngs(tmp_path / 'a', mnist[1][:2]), write_pngs(tmp_path / 'b', mnist[1][2:4])
    garbage = tmp_path / 'garbage.pth'
    garbage.write_bytes(np.random.default_rng(0).bytes(1000))
    assert_user_error(run_cli(a, b, '--weights', garbage, tmp_path=tmp_path), 'garbage.pth')
    assert_user_error(run_cli(a, b, '--weights', tmp_path / 'absent.pth', tmp_path=tmp_path), 'absent.pth')
    assert not (tmp_path / 'cli-cache').exists()                             # no download was tried
