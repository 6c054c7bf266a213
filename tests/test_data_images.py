"""The image datasets: the real CIFAR-10 npz, generated torchvision CIFAR folders, a generated
tiny-imagenet-200 folder, data-root resolution and the missing-dataset error, and one short end-to-end run."""
import json
import pickle

import numpy as np
import pytest
import torch

from bench.config import resolve
from bench.data.augment import ImageAugment
from bench.data.base import DatasetNotFoundError
from bench.data.root import DatasetFormatError
from bench.nn.archs import build_plain
from bench.registry import ARCHS, DATASETS, register_arch

TINY_ARCH = "test-conv32"  # a small conv net on 32×32 inputs for the end-to-end run (4C3F: test_image_certify)
if TINY_ARCH not in ARCHS.names():
    register_arch(TINY_ARCH)(lambda shape, classes, normalize=None: build_plain(
        [("c", 8, 3, 2, 1), ("c", 8, 4, 2, 1), ("d", 16)], shape, classes, normalize))


@pytest.fixture(autouse=True)
def _isolated_roots(monkeypatch, tmp_path):
    """No BENCH_DATA, and a user cache inside the test's tmp folder."""
    monkeypatch.delenv("BENCH_DATA", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))


def load(name, **cfg):
    return DATASETS.get(name)(cfg, 1)


# ---------------------------------------------------------------------------------------------------------
# generated data in the standard formats
# ---------------------------------------------------------------------------------------------------------
def rng_images(n, seed, side=32):
    return np.random.default_rng(seed).integers(0, 256, size=(n, 3, side, side), dtype=np.uint8)


def write_cifar_folder(root, name="cifar10", per_batch=4):
    """A torchvision-format folder: pickled dicts whose 'data' rows are 3072 bytes, R plane | G | B."""
    if name == "cifar10":
        folder, files, key, classes = root / "cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], \
            "labels", 10
        meta = ("batches.meta", "label_names")
    else:
        folder, files, key, classes = root / "cifar-100-python", ["train"], "fine_labels", 100
        meta = ("meta", "fine_label_names")
    folder.mkdir(parents=True)
    x = {"train": rng_images(per_batch * len(files), 1), "test": rng_images(per_batch, 2)}
    y = {s: np.arange(len(x[s])) % classes for s in x}
    for split, names in (("train", files), ("test", ["test_batch" if name == "cifar10" else "test"])):
        for i, fname in enumerate(names):
            rows = slice(i * per_batch, (i + 1) * per_batch)
            batch = {"data": x[split][rows].reshape(per_batch, 3072), key: [int(v) for v in y[split][rows]],
                     "batch_label": fname}
            with open(folder / fname, "wb") as f:
                pickle.dump(batch, f, protocol=2)
    with open(folder / meta[0], "wb") as f:
        pickle.dump({meta[1]: [f"class{i}" for i in range(classes)]}, f)
    return x, y


def write_npz(path, n_train=8, n_test=6, lossless=True):
    x_tr, x_te = rng_images(n_train, 3), rng_images(n_test, 4)
    arrays = {"x_train": x_tr.transpose(0, 2, 3, 1), "y_train": np.arange(n_train) % 10,
              "x_test": x_te.transpose(0, 2, 3, 1), "y_test": np.arange(n_test) % 10}
    if lossless:
        arrays["test_lossless"] = np.arange(n_test) < 2
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, **arrays)
    return x_tr, x_te


def write_tiny_folder(root, wnids=("n02", "n01", "n03"), per_class=2, gray_one=True):
    """A tiny-imagenet-200 folder with 64×64 JPEGs (one grayscale) and val_annotations.txt."""
    from PIL import Image

    folder = root / "tiny-imagenet-200"
    (folder / "val" / "images").mkdir(parents=True)
    (folder / "wnids.txt").write_text("\n".join(wnids) + "\n")
    rng = np.random.default_rng(7)
    for k, nid in enumerate(wnids):
        images = folder / "train" / nid / "images"
        images.mkdir(parents=True)
        for i in range(per_class):
            arr = rng.integers(0, 256, size=(64, 64, 3), dtype=np.uint8)
            img = Image.fromarray(arr[..., 0], "L") if (gray_one and k == 0 and i == 0) else Image.fromarray(arr)
            img.save(images / f"{nid}_{i}.JPEG", quality=90)
        (folder / "train" / nid / f"{nid}_boxes.txt").write_text("")
    lines = []
    for j, nid in enumerate(reversed(wnids)):
        Image.fromarray(rng.integers(0, 256, size=(64, 64, 3), dtype=np.uint8)).save(
            folder / "val" / "images" / f"val_{j}.JPEG", quality=90)
        lines.append(f"val_{j}.JPEG\t{nid}\t0\t0\t63\t63")
    (folder / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")
    return folder


# ---------------------------------------------------------------------------------------------------------
# the real CIFAR-10 archive
# ---------------------------------------------------------------------------------------------------------
def test_real_cifar10_npz(real_cifar10):
    b = real_cifar10
    assert b.x_train.shape == (50_000, 3, 32, 32) and b.x_train.dtype == torch.uint8
    assert b.x_test.shape == (10_000, 3, 32, 32) and b.y_test.dtype == torch.int64
    assert b.y_train[:5].tolist() == [6, 9, 9, 4, 1] and b.y_test[:5].tolist() == [3, 8, 8, 0, 6]
    assert torch.bincount(b.y_train).tolist() == [5000] * 10
    assert b.num_classes == 10 and b.input_shape == (3, 32, 32)
    assert b.scale == 255.0 and b.domain == (0.0, 1.0)
    mask = b.test_subsets["lossless"]
    assert mask.dtype == torch.bool and int(mask.sum()) == 1000 and bool(mask[:1000].all())
    assert b.info["class_names"][0] == "airplane"
    # the published per-channel train statistics in [0, 1] (shared/data/README.md): the layout is RGB, NCHW
    mean = b.inputs(b.x_train[:10_000]).mean(dim=(0, 2, 3))
    assert mean.tolist() == pytest.approx([0.4914, 0.4822, 0.4465], abs=0.01)
    assert isinstance(b.augment, ImageAugment) and (b.augment.size, b.augment.padding) == (32, 4)


def test_image_dataset_defaults():
    for name, side in (("cifar10", 32), ("cifar100", 32), ("tinyimagenet", 64)):
        factory = DATASETS.get(name)
        assert factory.input_shape == (3, side, side)
        assert factory.defaults["cert_eps"] == ["36/255", "72/255", "108/255"]
        assert factory.defaults["augment"] is True
        assert (factory.defaults["lower_bound_pairs"], factory.defaults["lower_bound_steps"]) == (4000, 1000)
    cfg = resolve({"method": "cll", "arch": "4c3f", "dataset": "cifar10"})
    assert cfg["normalize"] is None  # inputs in [0, 1], no normalisation (supplement B)


# ---------------------------------------------------------------------------------------------------------
# torchvision folders and npz archives
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_torchvision_folder(tmp_path, name):
    x, y = write_cifar_folder(tmp_path, name)
    b = load(name, data_root=str(tmp_path))
    assert torch.equal(b.x_train, torch.from_numpy(x["train"])) and torch.equal(b.x_test, torch.from_numpy(x["test"]))
    assert b.y_train.tolist() == y["train"].tolist() and b.y_test.tolist() == y["test"].tolist()
    assert b.num_classes == (10 if name == "cifar10" else 100) and b.info["format"] == "folder"
    assert b.test_subsets == {} and b.info["class_names"][1] == "class1"
    # pixel (c, h, w) of image i is byte c·1024 + h·32 + w of its row
    row = x["train"][1].reshape(3072)
    assert int(b.x_train[1, 2, 5, 7]) == int(row[2 * 1024 + 5 * 32 + 7])


def test_folder_is_preferred_to_npz_and_the_command_line_root_wins(tmp_path, monkeypatch):
    x, _ = write_cifar_folder(tmp_path / "a")
    write_npz(tmp_path / "a" / "cifar10.npz")
    assert load("cifar10", data_root=str(tmp_path / "a")).info["format"] == "folder"
    x_tr, _ = write_npz(tmp_path / "b" / "cifar10.npz")
    monkeypatch.setenv("BENCH_DATA", str(tmp_path / "a"))
    b = load("cifar10", data_root=str(tmp_path / "b"))          # --data-root before BENCH_DATA
    assert b.info["format"] == "npz" and torch.equal(b.x_train, torch.from_numpy(x_tr))
    assert load("cifar10").info["format"] == "folder"           # BENCH_DATA when no --data-root


def test_npz_with_lossless_mask_reports_a_test_subset(tmp_path):
    x_tr, x_te = write_npz(tmp_path / "cifar10.npz")
    b = load("cifar10", data_root=str(tmp_path))
    assert torch.equal(b.x_train, torch.from_numpy(x_tr)) and torch.equal(b.x_test, torch.from_numpy(x_te))
    assert b.test_subsets["lossless"].tolist() == [True, True, False, False, False, False]
    write_npz(tmp_path / "plain" / "cifar10.npz", lossless=False)
    assert load("cifar10", data_root=str(tmp_path / "plain")).test_subsets == {}


def test_malformed_npz_is_a_one_line_error(tmp_path):
    np.savez(tmp_path / "cifar10.npz", x_train=np.zeros((2, 3, 32, 32), np.uint8), y_train=np.zeros(2),
             x_test=np.zeros((1, 32, 32, 3), np.uint8), y_test=np.zeros(1))
    with pytest.raises(DatasetFormatError, match=r"x_train must be uint8 of shape \(N, 32, 32, 3\)"):
        load("cifar10", data_root=str(tmp_path))
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "cifar10.npz").write_bytes(b"not a zip")
    with pytest.raises(DatasetFormatError) as e:
        load("cifar10", data_root=str(tmp_path / "x"))
    assert "\n" not in str(e.value)


def test_missing_dataset_names_every_place_and_the_fetch_command(tmp_path, monkeypatch):
    monkeypatch.setenv("BENCH_DATA", str(tmp_path / "env"))
    with pytest.raises(DatasetNotFoundError) as e:
        load("cifar10", data_root=str(tmp_path / "cli"))
    msg = str(e.value)
    assert "\n" not in msg and "--download" in msg
    for place in (tmp_path / "cli", tmp_path / "env", tmp_path / "cache" / "lipbench"):
        assert f"{place}/cifar-10-batches-py" in msg and f"{place}/cifar10.npz" in msg
    with pytest.raises(DatasetNotFoundError) as e:
        load("tinyimagenet", data_root=str(tmp_path / "cli"))
    assert "tiny-imagenet-200.zip" in str(e.value) and f"{tmp_path / 'cli'}/tiny-imagenet-200" in str(e.value)


def test_download_goes_through_torchvision_into_the_first_root(tmp_path, monkeypatch):
    import torchvision

    calls = []

    class FakeCIFAR10:
        def __init__(self, root, train, download):
            calls.append((root, train, download))
            if not (tmp_path / "dl" / "cifar-10-batches-py").exists():
                write_cifar_folder(tmp_path / "dl")

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", FakeCIFAR10)
    with pytest.raises(DatasetNotFoundError):
        load("cifar10", data_root=str(tmp_path / "dl"))        # never without --download
    assert calls == []
    b = load("cifar10", data_root=str(tmp_path / "dl"), download=True)
    assert calls == [(str(tmp_path / "dl"), True, True), (str(tmp_path / "dl"), False, True)]
    assert len(b.y_train) == 20


def test_bench_run_reports_a_missing_dataset_in_one_line(tmp_path, capsys):
    from bench.cli import main

    code = main(["run", "--method", "cll", "--arch", "4c3f", "--dataset", "cifar10", "--data-root",
                 str(tmp_path / "nowhere"), "--results", str(tmp_path / "r"), "--quiet"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "not found; looked in" in err


# ---------------------------------------------------------------------------------------------------------
# Tiny-ImageNet
# ---------------------------------------------------------------------------------------------------------
def test_tinyimagenet_folder_is_converted_once_then_read(tmp_path):
    from PIL import Image

    folder = write_tiny_folder(tmp_path)
    b = load("tinyimagenet", data_root=str(tmp_path))
    assert b.x_train.shape == (6, 3, 64, 64) and b.x_train.dtype == torch.uint8 and b.x_test.shape == (3, 3, 64, 64)
    assert b.num_classes == 3 and b.input_shape == (3, 64, 64) and b.scale == 255.0
    assert b.y_train.tolist() == [0, 0, 1, 1, 2, 2]          # wnids.txt order, not sorted order
    assert b.y_test.tolist() == [2, 1, 0]                    # from val_annotations.txt
    first = np.asarray(Image.open(folder / "train" / "n02" / "images" / "n02_0.JPEG").convert("RGB"))
    assert torch.equal(b.x_train[0], torch.from_numpy(first.transpose(2, 0, 1).copy()))
    assert torch.equal(b.x_train[0, 0], b.x_train[0, 1])     # grayscale replicated to RGB
    assert (b.augment.size, b.augment.padding) == (64, 8)
    cache = tmp_path / "tiny-imagenet-200-uint8.npz"
    assert cache.is_file() and b.info["source"] == str(cache)
    import shutil

    shutil.rmtree(folder)                                    # afterwards only the array file is read
    again = load("tinyimagenet", data_root=str(tmp_path))
    assert torch.equal(again.x_train, b.x_train) and torch.equal(again.y_test, b.y_test)


def test_tinyimagenet_bad_image_size_is_reported(tmp_path):
    from PIL import Image

    folder = write_tiny_folder(tmp_path, wnids=("n01",), per_class=1, gray_one=False)
    Image.new("RGB", (32, 32)).save(folder / "train" / "n01" / "images" / "n01_0.JPEG")
    with pytest.raises(DatasetFormatError, match="expected a 64×64 image"):
        load("tinyimagenet", data_root=str(tmp_path))


# ---------------------------------------------------------------------------------------------------------
# end to end through the engine (short run on a generated npz)
# ---------------------------------------------------------------------------------------------------------
def test_short_image_run_writes_a_complete_result(tmp_path):
    """CLL on a generated CIFAR-10 npz, one epoch of a train subset: result.json has CRA at the paper's radii
    on test and test_lossless, the subset, and the lower-bound budget a short run actually used."""
    from bench import store
    from bench.train import train_run

    write_npz(tmp_path / "data" / "cifar10.npz", n_train=48, n_test=16)
    cfg = resolve({"method": "cll", "arch": TINY_ARCH, "dataset": "cifar10", "epochs": 1, "batch_size": 16,
                   "train_subset": 32, "data_root": str(tmp_path / "data"), "lower_bound_steps_short": 3})
    cfg["seed"] = 1
    folder = store.run_dir(tmp_path / "results", cfg)
    result = train_run(cfg, folder)
    on_disk = json.loads((folder / "result.json").read_text())
    assert on_disk["status"] == "complete" and on_disk["train_subset"] == 32
    for split in ("test", "test_lossless", "train"):
        assert set(on_disk["eval"][split]["cra"]) == {"36/255", "72/255", "108/255"}
    assert (result["lower_bound_pairs"], result["lower_bound_steps"]) == (16, 3)  # 32 images → 16 pairs
    assert 0.0 < result["lower_bound"] <= result["K_f"] and 0.0 < result["tightness"] <= 1.0
