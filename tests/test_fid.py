"""fid.py against numbers someone else computed: pytorch-fid 0.3.0's pool3 activations and its FID on MNIST,
the closed form of the Fréchet distance, and the command line's answers to bad input.

The reference material lives in ../shared (beside the repository, in CI too); see shared/fid/README.md.
test_mnist_fid_matches_pytorch_fid is the one slow test (2,000 images through Inception on CPU).
"""
import hashlib
import io
import os
import subprocess
import sys
import time
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import fid  # noqa: E402

SHARED = Path(__file__).resolve().parents[1].parent / 'shared'
WEIGHTS = SHARED / 'fid' / 'pt_inception-2015-12-05.pth'
MNIST = SHARED / 'data' / 'mnist.npz'
REFERENCE_FID = 15.897885677955372  # pytorch-fid CLI, MNIST x_train[:1000] vs x_test[:1000] as 28x28 RGB PNGs


def shared(path):
    if not path.exists():
        pytest.fail(f'{path} is missing: the FID tests need the shared reference folder at {SHARED} '
                    '(clone it beside the repository as ../shared)')
    return path


@pytest.fixture(scope='module')
def model():
    return fid.load_inception(shared(WEIGHTS))


@pytest.fixture(scope='module')
def mnist():
    with np.load(shared(MNIST)) as f:
        return f['x_train'][:1000], f['x_test'][:1000]


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
    reference = np.load(shared(SHARED / 'fid' / file))
    acts = fid.activations(images, model)
    assert acts.shape == (8, 2048)
    assert np.abs(acts - reference).max() < 1e-4


def test_png_folder_matches_pytorch_fid(model, mnist, tmp_path):
    # Recursive search, sorted paths, PNG decoding; files without an image extension are skipped.
    write_pngs(tmp_path / 'a', mnist[1][:8])
    write_pngs(tmp_path / 'a' / 'sub', random_images())
    (tmp_path / 'a' / 'notes.txt').write_text('not an image')
    acts = fid.folder_activations(tmp_path / 'a', model, batch_size=5)
    reference = np.concatenate([np.load(SHARED / 'fid' / 'act_mnist_test_0_8_rgb28.npy'),
                                np.load(SHARED / 'fid' / 'act_random_uint8_seed0_8x32x32x3.npy')])
    assert np.abs(acts - reference).max() < 1e-4
    assert np.array_equal(fid.folder_activations(tmp_path / 'a', model, n=3), acts[:3])


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
    result = run_cli(train, test, '--weights', WEIGHTS, tmp_path=tmp_path)
    seconds = time.perf_counter() - start
    value = fid_value(result)
    print(f'FID {value} (pytorch-fid: {REFERENCE_FID}); 2 x 1000 PNGs in {seconds:.0f} s end to end')
    assert abs(value - REFERENCE_FID) < 0.01
    assert '1000 from' in result.stdout


# --- the Fréchet distance ---------------------------------------------------------------------------------

def test_distance_of_a_set_to_itself_is_zero():
    mu, sigma = fid.statistics(np.random.default_rng(1).normal(size=(500, 32)))
    assert abs(fid.frechet_distance(mu, sigma, mu, sigma)) < 1e-6


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
    result = run_cli(folder, '--save-stats', tmp_path / 'a.npz', '--weights', WEIGHTS, tmp_path=tmp_path)
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
    a, b = write_pngs(tmp_path / 'a', mnist[1][:8]), write_pngs(tmp_path / 'b', mnist[0][:8])
    samples = torch.from_numpy(mnist[1][:8])[:, None].float() / 127.5 - 1
    calls = []
    monkeypatch.setattr(fid, 'frechet_distance', lambda *stats: calls.append(stats) or 1.5)
    assert fid.fid_from_samples(samples, b, n=6, model=model) == 1.5
    expected = [*fid.statistics(fid.folder_activations(a, model, n=6)),
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


# --- where the weights come from (never the network here) ---------------------------------------------

def test_weights_resolution_order(tmp_path, monkeypatch):
    monkeypatch.setenv('XDG_CACHE_HOME', str(tmp_path / 'cache'))
    monkeypatch.setenv('FID_WEIGHTS', str(WEIGHTS))
    other = tmp_path / 'other.pth'
    other.write_bytes(b'')
    assert fid.find_weights(other) == other                                  # the explicit path wins
    assert fid.find_weights() == WEIGHTS                                     # then $FID_WEIGHTS
    monkeypatch.delenv('FID_WEIGHTS')
    cached = tmp_path / 'cache' / 'ddpm-toolkit' / fid.WEIGHTS_NAME
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b'')
    assert fid.find_weights() == cached                                      # then the cache file
    with pytest.raises(fid.FIDError, match='no such file'):
        fid.find_weights(tmp_path / 'missing.pth')


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


def test_no_weights_and_no_network_says_where_to_put_them(tmp_path, monkeypatch):
    monkeypatch.setenv('XDG_CACHE_HOME', str(tmp_path / 'cache'))
    monkeypatch.delenv('FID_WEIGHTS', raising=False)

    def offline(*args, **kwargs):
        raise urllib.error.URLError('no network')
    monkeypatch.setattr(fid.urllib.request, 'urlopen', offline)
    with pytest.raises(fid.FIDError) as error:
        fid.find_weights()
    message = str(error.value)
    assert 'FID_WEIGHTS' in message and '--weights' in message and str(tmp_path / 'cache') in message


# --- the command line's errors: exit status 2 and one line, never a traceback ---------------------------

def assert_user_error(result, *words):
    assert result.returncode == 2, (result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and 'Traceback' not in result.stderr, result.stderr
    for word in words:
        assert str(word) in lines[0], lines[0]


def test_cli_missing_path(tmp_path):
    assert_user_error(run_cli(tmp_path / 'nowhere', tmp_path, tmp_path=tmp_path), 'nowhere', 'no such')


def test_cli_folder_with_fewer_than_two_images(mnist, tmp_path):
    one, two = write_pngs(tmp_path / 'one', mnist[1][:1]), write_pngs(tmp_path / 'two', mnist[1][:2])
    assert_user_error(run_cli(one, two, '--weights', WEIGHTS, tmp_path=tmp_path), 'one', 'at least 2')
    assert_user_error(run_cli(two, two, '--n', 5, '--weights', WEIGHTS, tmp_path=tmp_path), 'n = 5')


def test_cli_mismatched_stats(tmp_path):
    fid.save_stats(tmp_path / 'a.npz', np.zeros(2048), np.eye(2048))
    fid.save_stats(tmp_path / 'b.npz', np.zeros(64), np.eye(64))
    assert_user_error(run_cli(tmp_path / 'a.npz', tmp_path / 'b.npz', tmp_path=tmp_path), 'b.npz', '64-d')


def test_cli_stats_file_without_its_keys(tmp_path):
    np.savez(tmp_path / 'bad.npz', mean=np.zeros(3))
    fid.save_stats(tmp_path / 'good.npz', np.zeros(3), np.eye(3))
    assert_user_error(run_cli(tmp_path / 'bad.npz', tmp_path / 'good.npz', tmp_path=tmp_path), 'bad.npz', 'mu')


def test_cli_unreadable_file_among_images(mnist, tmp_path):
    folder = write_pngs(tmp_path / 'a', mnist[1][:3])
    (folder / 'broken.png').write_bytes(b'this is not a PNG')
    assert_user_error(run_cli(folder, folder, '--weights', WEIGHTS, tmp_path=tmp_path), 'broken.png')


def test_cli_garbage_weights(mnist, tmp_path):
    folder = write_pngs(tmp_path / 'a', mnist[1][:2])
    garbage = tmp_path / 'garbage.pth'
    garbage.write_bytes(np.random.default_rng(0).bytes(1000))
    assert_user_error(run_cli(folder, folder, '--weights', garbage, tmp_path=tmp_path), 'garbage.pth')
    assert_user_error(run_cli(folder, folder, '--weights', tmp_path / 'absent.pth', tmp_path=tmp_path), 'absent.pth')
