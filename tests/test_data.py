"""The decoded-image cache (one memory-mapped file, written atomically, rebuilt when damaged) and two-node training."""
import fcntl
import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image

import data
import fid
import train
from test_train import TINY, folder  # noqa: F401  (folder is a fixture)

SIZE = (16, 16)


def load(folder):
    return data.load_dataset(str(folder), SIZE)


def decoded(folder):
    """What read_image gives for every image file under folder, as uint8 [N, 3, H, W]."""
    return torch.from_numpy(np.stack([data.read_image(p, SIZE).transpose(2, 0, 1) for p in data.find_images(str(folder))]))


def mapped_file(tensor):
    """The file mapped at the tensor's data, from /proc/self/maps; None for anonymous memory."""
    for line in open("/proc/self/maps"):
        fields = line.split(maxsplit=5)
        start, end = (int(v, 16) for v in fields[0].split("-"))
        if start <= tensor.data_ptr() < end:
            return fields[5].strip() if len(fields) > 5 else None


def cache_files(tmp_path):
    folder = tmp_path / "cache" / "ddpm-toolkit"
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def test_two_loads_map_one_cache_file_that_holds_the_decoded_images(folder, tmp_path, capsys):
    first, labels, _ = load(folder)
    assert "decoded 12/12 images" in capsys.readouterr().out
    second, _, _ = load(folder)
    assert capsys.readouterr().out == ""  # the cache, not a second decode
    assert torch.equal(first, decoded(folder)) and torch.equal(second, first) and labels.tolist() == [0] * 12
    npy = [name for name in cache_files(tmp_path) if name.endswith(".npy")]
    assert len(npy) == 1 and cache_files(tmp_path) == [npy[0][:-4] + ".json", npy[0]]
    path = str(tmp_path / "cache" / "ddpm-toolkit" / npy[0])
    assert mapped_file(first) == mapped_file(second) == path  # both read the file, neither holds a copy
    assert first.data_ptr() != second.data_ptr()


@pytest.mark.parametrize("damage", ["truncated", "garbage", "bad json", "bad metadata"])
def test_a_damaged_cache_is_said_and_decoded_again(folder, tmp_path, capsys, damage):
    load(folder)
    npy = next((tmp_path / "cache" / "ddpm-toolkit").glob("*.npy"))
    if damage == "truncated":
        os.truncate(npy, npy.stat().st_size // 2)
    elif damage == "garbage":
        npy.write_bytes(b"not an array at all")
    elif damage == "bad json":
        npy.with_suffix(".json").write_text('{"labels": [0, 0')
    else:  # valid JSON, of the wrong types: a string for the grey flag would train colour images as grey
        npy.with_suffix(".json").write_text('{"labels": [0' + ', 0' * 11 + '], "classes": "ab", "grey": "no"}')
    capsys.readouterr()
    images, _, _ = load(folder)
    out = capsys.readouterr().out
    assert f"cache {npy} is unreadable (" in out and "decoding again" in out and "decoded 12/12 images" in out
    assert torch.equal(images, decoded(folder))
    load(folder)
    assert capsys.readouterr().out == ""  # repaired


def test_an_interrupted_decode_leaves_no_cache(folder, tmp_path, monkeypatch):
    real = data.read_image

    def ctrl_c_at_the_fifth(path, size):
        if path.endswith("5.png"):
            raise KeyboardInterrupt
        return real(path, size)

    monkeypatch.setattr(data, "read_image", ctrl_c_at_the_fifth)
    with pytest.raises(KeyboardInterrupt):
        load(folder)
    assert cache_files(tmp_path) == []  # the temporary file is gone too


KILLED_WORKER = """
import sys, time, types
sys.path.insert(0, {root!r})
import data
real = data.read_image
def stuck_at_the_fifth(path, size):
    if path.endswith("5.png"):
        open({marker!r}, "w").close()
        time.sleep(60)
    return real(path, size)
data.read_image = stuck_at_the_fifth
data.load_dataset({data!r}, (16, 16))
"""


def test_a_decode_killed_midway_is_not_trusted_and_its_file_is_removed_later(folder, tmp_path, capsys):
    marker, worker = tmp_path / "stuck", tmp_path / "worker.py"
    worker.write_text(KILLED_WORKER.format(root=os.path.dirname(train.__file__), marker=str(marker), data=str(folder)))
    p = subprocess.Popen([sys.executable, str(worker)], env={**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache")})
    for _ in range(600):
        if marker.exists() or p.poll() is not None:
            break
        time.sleep(0.05)
    p.send_signal(signal.SIGKILL)
    p.wait()
    left = cache_files(tmp_path)
    assert len(left) == 1 and left[0].endswith(".tmp")  # a partial file under a name no run reads
    orphan, live = tmp_path / "cache" / "ddpm-toolkit" / left[0], tmp_path / "cache" / "ddpm-toolkit" / "data-x.npy.y.tmp"
    live.write_bytes(b"a decode in progress")
    with open(live) as held:
        fcntl.flock(held, fcntl.LOCK_EX)  # its decoder, still alive
        for f in (orphan, live):
            os.utime(f, (time.time() - 120,) * 2)  # a minute old: only the lock tells them apart
        images, _, _ = load(folder)
    assert "decoded 12/12 images" in capsys.readouterr().out and torch.equal(images, decoded(folder))
    assert not orphan.exists() and live.exists()


@pytest.mark.parametrize("value", ["", "relative/cache"])
def test_an_empty_or_relative_xdg_cache_home_means_the_home_cache(folder, tmp_path, monkeypatch, value):
    monkeypatch.setenv("XDG_CACHE_HOME", value)  # as unset (the XDG spec), not under the current folder
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(folder)
    load(folder)
    assert any((tmp_path / "home" / ".cache" / "ddpm-toolkit").glob("data-*.npy"))
    assert not (folder / "ddpm-toolkit").exists() and not (folder / "relative").exists()


def test_a_changed_folder_is_decoded_again_and_only_earlier_caches_removed(tmp_path, capsys, monkeypatch):
    root, cache = tmp_path / "data", tmp_path / "cache" / "ddpm-toolkit"
    root.mkdir()
    for i, colour in enumerate(("red", "green")):
        Image.new("RGB", (16, 16), colour).save(root / f"{i}.png")
    load(root)
    Image.new("RGB", (16, 16), "blue").save(root / "0.png")
    os.mkfifo(cache / "data-fifo.json")  # never opened: reading it would block
    later, read = cache / "data-later", data.read_image

    def another_run_caches_a_newer_state(path, size):  # while this decode runs: a cache to keep
        if not later.with_suffix(".json").exists():
            later.with_suffix(".npy").write_bytes(b"")
            later.with_suffix(".json").write_text(json.dumps({"source": [str(root), [16, 16], False]}))
        return read(path, size)
    monkeypatch.setattr(data, "read_image", another_run_caches_a_newer_state)
    capsys.readouterr()
    images, _, _ = load(root)
    out = capsys.readouterr().out
    assert "decoded 2/2 images" in out and out.count("the image cache of an earlier state of") == 1
    assert torch.equal(images, decoded(root))  # not the cache of the old file
    assert len(cache_files(tmp_path)) == 5  # the new .npy and .json, the FIFO, the later cache's two files


def test_a_cache_written_before_the_cache_kept_readable_indices_is_removed(folder, tmp_path, capsys):
    cache = tmp_path / "cache" / "ddpm-toolkit"
    cache.mkdir(parents=True)
    old = cache / "data-old"  # its source also named --cond, and its key differs: never read again
    np.save(old.with_suffix(".npy"), np.zeros((1, 3, 16, 16), np.uint8))
    old.with_suffix(".json").write_text(json.dumps({"labels": [0], "classes": [], "grey": False,
                                                    "source": [str(folder), [16, 16], False]}))
    for f in (old.with_suffix(".npy"), old.with_suffix(".json")):
        os.utime(f, (time.time() - 120,) * 2)
    load(folder)
    assert "the image cache of an earlier state of" in capsys.readouterr().out
    assert not old.with_suffix(".json").exists() and not old.with_suffix(".npy").exists()


def test_a_killed_decodes_file_is_removed_by_a_run_that_finds_the_cache(folder, tmp_path, capsys):
    load(folder)
    orphan = tmp_path / "cache" / "ddpm-toolkit" / "data-x.npy.y.tmp"
    orphan.write_bytes(b"left by a killed decode")
    os.utime(orphan, (time.time() - 120,) * 2)
    capsys.readouterr()
    load(folder)
    assert capsys.readouterr().out == "" and not orphan.exists()  # the cache was read, and the orphan removed


def test_an_unwritable_cache_folder_warns_and_trains(folder, tmp_path, monkeypatch, capsys):
    (tmp_path / "blocked").write_text("a file where the cache folder would go")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "blocked"))
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path / "scratch"))
    (tmp_path / "scratch").mkdir()
    images, _, _ = load(folder)
    lines = capsys.readouterr().out.splitlines()
    assert sum("warning: cannot write the image cache" in line for line in lines) == 1
    assert torch.equal(images, decoded(folder))
    assert mapped_file(images).startswith(str(tmp_path / "scratch")) and mapped_file(images).endswith("(deleted)")
    assert os.listdir(tmp_path / "scratch") == []  # the data lives until the mapping ends, then nothing is left
    train.main(["--data", str(folder), "--out", str(tmp_path / "run"), "--steps", "1", *TINY])
    assert (tmp_path / "run" / "ckpt.pt").exists()


def test_fid_finds_the_images_train_finds_through_links(tmp_path):
    root, outside = tmp_path / "data", tmp_path / "outside"
    (root / "a").mkdir(parents=True)
    outside.mkdir()
    for image in (root / "a" / "1.png", root / "2.png", outside / "3.png"):
        Image.new("RGB", (4, 4)).save(image)
    (root / "out").symlink_to(outside)  # followed
    (root / "out2").symlink_to(outside)  # the same folder again: read once, as out/ (sorted first), by both
    (root / "again").symlink_to(root / "a")  # skipped: that folder is read as a/
    (root / "a" / "loop").symlink_to(root)  # a loop
    expected = [str(root / "2.png"), str(root / "a" / "1.png"), str(root / "out" / "3.png")]
    assert data.find_images(str(root)) == expected and [str(p) for p in fid.image_files(root)] == expected


def test_hidden_files_and_folders_are_neither_images_nor_classes(tmp_path):
    root = tmp_path / "data"
    for folder in ("cats", "dogs", ".ipynb_checkpoints", "dogs/.thumbs"):
        (root / folder).mkdir(parents=True)
        Image.new("RGB", (4, 4)).save(root / folder / "1.png")
    (root / "cats" / "._1.png").write_bytes(b"\x00\x05\x16\x07 a Mac's resource fork, no image")
    expected = [str(root / "cats" / "1.png"), str(root / "dogs" / "1.png")]
    assert data.find_images(str(root)) == expected and [str(p) for p in fid.image_files(root)] == expected
    assert data.class_labels(str(root), expected, True)[1] == ["cats", "dogs"]


def test_fid_decodes_rotated_16_bit_and_transparent_images_as_training_does(tmp_path):
    clear = Image.new("RGBA", (6, 4), (255, 0, 0, 0))  # transparent red: white, not red or black
    clear.putpixel((0, 0), (0, 0, 255, 255))
    clear.save(tmp_path / "clear.png")
    Image.fromarray(np.arange(24, dtype=np.uint16).reshape(4, 6) * 2000).save(tmp_path / "grey16.png")
    rotated = Image.new("RGB", (6, 4), "green")
    exif = rotated.getexif()
    exif[0x0112] = 6  # shown turned a quarter clockwise: 4 wide, 6 high
    rotated.save(tmp_path / "rotated.jpg", exif=exif)
    for name in ("clear.png", "grey16.png", "rotated.jpg"):
        image = fid.read_image(tmp_path / name)
        assert np.array_equal(image, data.read_image(str(tmp_path / name), image.shape[:2])), name
    assert fid.read_image(tmp_path / "rotated.jpg").shape == (6, 4, 3)
    assert fid.read_image(tmp_path / "clear.png")[0, 1].tolist() == [255, 255, 255]
    assert fid.read_image(tmp_path / "grey16.png").max() == 23 * 2000 // 257  # not clipped to 255
    Image.fromarray(np.ones((4, 6), np.float32)).save(tmp_path / "float.tif")  # no standard range: train skips it
    with pytest.raises(fid.FIDError, match="32-bit pixels"):
        fid.read_image(tmp_path / "float.tif")


def test_fid_at_a_size_decodes_exactly_as_training_does(tmp_path):
    # fid.py keeps a copy of the training decoder (it works copied alone): this keeps the two equal, file by file.
    rng = np.random.default_rng(0)
    photo = Image.fromarray(rng.integers(0, 256, (300, 400, 3), dtype=np.uint8))
    photo.save(tmp_path / "big.jpg", quality=90)  # decoded at a reduced scale (draft) by both
    photo.convert("CMYK").save(tmp_path / "cmyk.jpg")
    exif = photo.getexif()
    exif[0x0112] = 6
    photo.save(tmp_path / "turned.jpg", exif=exif)
    photo.convert("P", palette=Image.Palette.ADAPTIVE).save(tmp_path / "palette.png", transparency=3)
    Image.fromarray(rng.integers(0, 65536, (30, 50), dtype=np.uint16)).save(tmp_path / "grey16.png")
    Image.fromarray(rng.integers(0, 256, (40, 30, 4), dtype=np.uint8)).save(tmp_path / "rgba.png")
    photo.save(tmp_path / "anim.gif", save_all=True, append_images=[photo.rotate(90)])
    for name in sorted(os.listdir(tmp_path)):
        for size in ((16, 16), (24, 40)):
            assert np.array_equal(fid.read_image(tmp_path / name, size=size),
                                  data.read_image(str(tmp_path / name), size)), (name, size)


def test_a_fifo_named_like_an_image_is_skipped(tmp_path):
    Image.new("RGB", (20, 20), (200, 30, 30)).save(tmp_path / "real.png")
    os.mkfifo(tmp_path / "x.png")  # reading it would block forever
    assert data.find_images(str(tmp_path)) == [str(tmp_path / "real.png")]
    assert len(load(tmp_path)[0]) == 1


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_nodes_train_in_step_and_their_checkpoint_resumes_in_one_process(folder, tmp_path, ddp_worker):
    out, port = tmp_path / "run", free_port()
    out.mkdir()
    nodes = []
    for rank in (0, 1):  # each "node" has its own cache folder, as separate machines would
        env = {**os.environ, "OMP_NUM_THREADS": "1", "XDG_CACHE_HOME": str(tmp_path / f"cache{rank}")}
        nodes.append(subprocess.Popen(
            [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
             "--node_rank", str(rank), "--master_addr", "127.0.0.1", "--master_port", str(port), str(ddp_worker),
             "--data", str(folder), "--out", str(out), "--steps", "4", *TINY],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env))
    logs = [node.communicate(timeout=120) for node in nodes]
    for node, (stdout, stderr) in zip(nodes, logs):
        assert node.returncode == 0, stderr[-3000:]
    assert "batch 4 = 2 process(es) x 1 accumulation x 2" in logs[0][0] and "done:" in logs[0][0]
    assert "done:" not in logs[1][0]  # rank 0 alone logs and writes
    for rank in (0, 1):
        assert any(p.suffix == ".json" for p in (tmp_path / f"cache{rank}" / "ddpm-toolkit").iterdir())
    rank0, rank1 = (torch.load(out / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    assert ckpt["step"] == 4
    for name in rank0:
        assert torch.equal(rank0[name], rank1[name]) and torch.equal(rank0[name], ckpt["model"][name]), name
    train.main(["--out", str(out), "--resume", "--steps", "6"])
    assert torch.load(out / "ckpt.pt", weights_only=True)["step"] == 6
