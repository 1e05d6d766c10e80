"""Data layer: tiny files in the real formats go through torchvision's real dataset classes.

References are independent: pixels are recovered from the normalised tensors and compared with the bytes
written, augmentation is compared with a per-pixel loop, and multi-rank batching with the single-process run.
"""

from __future__ import annotations

import gzip
import hashlib
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from torchvision import datasets as tvd

from raymoe.config.load import load_experiment
from raymoe.config.schema import DataConfig
from raymoe.data import sources
from raymoe.data.augment import AugmentParams, apply_augment, draw_params
from raymoe.data.batches import eval_batches, num_train_steps, train_batches
from raymoe.data.datasets import Split, load_dataset
from raymoe.data.stats import DATASETS
from raymoe.errors import ConfigError

CPU = torch.device("cpu")
REAL_FMNIST = Path("/usr/share/datasets/fashion-mnist")
IDX_FOLDER = {"mnist": "MNIST", "fashion_mnist": "FashionMNIST"}


# ---------------------------------------------------------------- writers of the real formats

def write_idx(path: Path, array: np.ndarray, gz: bool) -> Path:
    """IDX: big-endian magic 0x00000800 + ndim (unsigned byte data), big-endian dims, then the raw bytes."""
    payload = struct.pack(">I", 0x800 + array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    payload += array.astype(np.uint8).tobytes()
    if gz:
        path = path.with_name(path.name + ".gz")
        with gzip.open(path, "wb") as f:
            f.write(payload)
    else:
        path.write_bytes(payload)
    return path


def make_idx_set(folder: Path, seed: int, n_train: int = 12, n_test: int = 5, gz: bool = True) -> dict:
    """The four (Fashion-)MNIST files in `folder`; returns the arrays written."""
    rng = np.random.default_rng(seed)
    arrays = {"train_x": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
              "train_y": rng.integers(0, 10, n_train, dtype=np.uint8),
              "test_x": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
              "test_y": rng.integers(0, 10, n_test, dtype=np.uint8)}
    folder.mkdir(parents=True, exist_ok=True)
    write_idx(folder / "train-images-idx3-ubyte", arrays["train_x"], gz)
    write_idx(folder / "train-labels-idx1-ubyte", arrays["train_y"], gz)
    write_idx(folder / "t10k-images-idx3-ubyte", arrays["test_x"], gz)
    write_idx(folder / "t10k-labels-idx1-ubyte", arrays["test_y"], gz)
    return arrays


def _dump(path: Path, obj: dict) -> None:
    # The originals are Python 2 pickles whose str keys load as str under torchvision's encoding="latin1"
    # (they read as b"data"/b"labels" only with encoding="bytes"); Python 3 str keys load identically.
    path.write_bytes(pickle.dumps(obj, protocol=2))


def make_cifar_set(root: Path, name: str, seed: int, per_batch: int = 3, n_test: int = 4) -> dict:
    """CIFAR python batches under root/<base_folder>: rows of 3072 bytes, R then G then B planes, row-major."""
    rng = np.random.default_rng(seed)
    classes = 10 if name == "cifar10" else 100
    folder = root / sources.LAYOUTS[name].folder
    folder.mkdir(parents=True)
    label_key = "labels" if name == "cifar10" else "fine_labels"

    def batch(n):
        return {"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                label_key: [int(v) for v in rng.integers(0, classes, n)], "batch_label": "fixture"}

    if name == "cifar10":
        train_parts = [batch(per_batch) for _ in range(5)]
        for i, part in enumerate(train_parts, 1):
            _dump(folder / f"data_batch_{i}", part)
        test = batch(n_test)
        _dump(folder / "test_batch", test)
        _dump(folder / "batches.meta", {"label_names": [f"c{i}" for i in range(10)], "num_cases_per_batch": 3})
    else:
        train_parts = [batch(per_batch * 5)]
        _dump(folder / "train", train_parts[0])
        test = batch(n_test)
        _dump(folder / "test", test)
        _dump(folder / "meta", {"fine_label_names": [f"f{i}" for i in range(100)],
                                "coarse_label_names": [f"c{i}" for i in range(20)]})
    return {"train_x": np.concatenate([p["data"] for p in train_parts]).reshape(-1, 3, 32, 32),
            "train_y": np.concatenate([p[label_key] for p in train_parts]),
            "test_x": test["data"].reshape(-1, 3, 32, 32), "test_y": np.array(test[label_key])}


def trust_fixture_checksums(monkeypatch, root: Path, name: str) -> None:
    """torchvision checks CIFAR files against the official MD5s; give its class the fixture files' MD5s instead.

    The real class then runs its real integrity check and loader on our files; nothing else is replaced.
    """
    cls = {"cifar10": tvd.CIFAR10, "cifar100": tvd.CIFAR100}[name]
    folder = root / cls.base_folder

    def md5(file):
        return hashlib.md5((folder / file).read_bytes()).hexdigest()

    monkeypatch.setattr(cls, "train_list", [[f, md5(f)] for f, _ in cls.train_list])
    monkeypatch.setattr(cls, "test_list", [[f, md5(f)] for f, _ in cls.test_list])
    monkeypatch.setattr(cls, "meta", {**cls.meta, "md5": md5(cls.meta["filename"])})


@pytest.fixture
def no_system_copy(monkeypatch):
    monkeypatch.setattr(sources, "SYSTEM_LOCATIONS", {})


def recover_pixels(x: torch.Tensor, name: str) -> np.ndarray:
    info = DATASETS[name]
    mean = torch.tensor(info.mean, dtype=torch.float64).view(1, -1, 1, 1)
    std = torch.tensor(info.std, dtype=torch.float64).view(1, -1, 1, 1)
    return torch.round((x.double() * std + mean) * 255).to(torch.int64).numpy()


def assert_normalised_once(x: torch.Tensor, raw: np.ndarray, name: str) -> None:
    info = DATASETS[name]
    mean = np.array(info.mean).reshape(1, -1, 1, 1)
    std = np.array(info.std).reshape(1, -1, 1, 1)
    expected = (raw.astype(np.float64) / 255 - mean) / std
    assert x.dtype == torch.float32
    np.testing.assert_allclose(x.double().numpy(), expected, rtol=0, atol=2e-6)
    assert abs(x.double().mean().item() - expected.mean()) < 1e-6
    assert abs(x.double().std().item() - expected.std(ddof=1)) < 1e-6


# ---------------------------------------------------------------- loading

@pytest.mark.parametrize("name", ["mnist", "fashion_mnist"])
@pytest.mark.parametrize("gz", [True, False], ids=["gzipped", "plain"])
def test_idx_round_trip_through_torchvision(tmp_path, no_system_copy, name, gz):
    arrays = make_idx_set(tmp_path / IDX_FOLDER[name] / "raw", seed=1, gz=gz)
    data = load_dataset(DataConfig(name=name, root=str(tmp_path), download=False), CPU)
    assert (data.name, data.num_classes, data.in_channels, data.image_size) == (name, 10, 1, 28)
    assert data.augment is False
    assert "data.root" in data.source and str(tmp_path) in data.source
    for split, key in ((data.train, "train"), (data.test, "test")):
        raw = arrays[f"{key}_x"][:, None]
        assert split.x.shape == raw.shape and split.y.dtype == torch.int64
        np.testing.assert_array_equal(recover_pixels(split.x, name), raw)
        np.testing.assert_array_equal(split.y.numpy(), arrays[f"{key}_y"])
        assert_normalised_once(split.x, raw, name)


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_cifar_round_trip_through_torchvision(tmp_path, monkeypatch, no_system_copy, name):
    arrays = make_cifar_set(tmp_path, name, seed=2)
    trust_fixture_checksums(monkeypatch, tmp_path, name)
    data = load_dataset(DataConfig(name=name, root=str(tmp_path), download=False), CPU)
    assert (data.num_classes, data.in_channels, data.image_size) == ((10 if name == "cifar10" else 100), 3, 32)
    assert data.augment is (name == "cifar100")  # paper: augmentation only in the CIFAR-100 code
    assert len(data.train) == 15 and len(data.test) == 4
    for split, key in ((data.train, "train"), (data.test, "test")):
        np.testing.assert_array_equal(recover_pixels(split.x, name), arrays[f"{key}_x"])
        np.testing.assert_array_equal(split.y.numpy(), arrays[f"{key}_y"])
        assert_normalised_once(split.x, arrays[f"{key}_x"], name)
    off = load_dataset(DataConfig(name=name, root=str(tmp_path), download=False, augment=False), CPU)
    assert off.augment is False


def test_limits_take_the_first_samples(tmp_path, no_system_copy):
    arrays = make_idx_set(tmp_path / "FashionMNIST" / "raw", seed=3)
    data = load_dataset(DataConfig(root=str(tmp_path), download=False, train_limit=7, test_limit=2), CPU)
    assert len(data.train) == 7 and len(data.test) == 2
    np.testing.assert_array_equal(recover_pixels(data.train.x, "fashion_mnist"), arrays["train_x"][:7, None])
    np.testing.assert_array_equal(data.test.y.numpy(), arrays["test_y"][:2])


def test_root_wins_over_system_copy_which_is_used_when_root_is_empty(tmp_path, monkeypatch):
    system = tmp_path / "usr-share" / "fashion-mnist"
    from_system = make_idx_set(system, seed=4)  # flat, gzipped: Debian's layout
    monkeypatch.setattr(sources, "SYSTEM_LOCATIONS", {"fashion_mnist": (str(system),)})

    root = tmp_path / "root"
    from_root = make_idx_set(root / "FashionMNIST" / "raw", seed=5)
    data = load_dataset(DataConfig(root=str(root), download=False), CPU)
    np.testing.assert_array_equal(data.train.y.numpy(), from_root["train_y"])
    assert data.source.startswith("Fashion-MNIST from data.root")

    empty = tmp_path / "empty"
    data = load_dataset(DataConfig(root=str(empty), download=False), CPU)
    np.testing.assert_array_equal(recover_pixels(data.train.x, "fashion_mnist"), from_system["train_x"][:, None])
    np.testing.assert_array_equal(data.test.y.numpy(), from_system["test_y"])
    assert data.source == f"Fashion-MNIST from system copy {system}"
    assert not list(system.glob("*-ubyte")), "the system copy must not be written to"


def test_partial_root_is_skipped_for_the_system_copy(tmp_path, monkeypatch):
    system = tmp_path / "system"
    make_idx_set(system, seed=6)
    monkeypatch.setattr(sources, "SYSTEM_LOCATIONS", {"fashion_mnist": (str(system),)})
    raw = tmp_path / "root" / "FashionMNIST" / "raw"
    make_idx_set(raw, seed=7)
    (raw / "t10k-labels-idx1-ubyte.gz").unlink()
    located = sources.check_available(DataConfig(root=str(tmp_path / "root"), download=False))
    assert located.kind == "system" and located.folder == system


def test_nothing_found_names_all_three_places_and_the_fixes(tmp_path, monkeypatch):
    system = tmp_path / "nowhere"
    monkeypatch.setattr(sources, "SYSTEM_LOCATIONS", {"fashion_mnist": (str(system),)})
    root = tmp_path / "root"
    with pytest.raises(sources.DataError) as info:
        load_dataset(DataConfig(root=str(root), download=False), CPU)
    err = info.value
    assert isinstance(err, ConfigError) and err.path == "data.name" and err.value == "fashion_mnist"
    text = str(err)
    assert "1) data.root: " + str(root / "FashionMNIST" / "raw") in text
    assert "2) system copy: " + str(system) in text
    assert "3) torchvision download" in text and "off (data.download = false)" in text
    assert "apt-get install dataset-fashion-mnist" in text
    assert f"into {root / 'FashionMNIST' / 'raw'}" in text and "--set data.download=true" in text


def test_corrupt_gzip_names_the_file(tmp_path, no_system_copy):
    raw = tmp_path / "MNIST" / "raw"
    make_idx_set(raw, seed=8, n_train=40)
    victim = raw / "train-images-idx3-ubyte.gz"
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    with pytest.raises(sources.DataError, match=str(victim)) as info:
        load_dataset(DataConfig(name="mnist", root=str(tmp_path), download=False), CPU)
    assert "corrupt or truncated" in str(info.value)


def test_truncated_plain_idx_names_the_file(tmp_path, no_system_copy):
    raw = tmp_path / "MNIST" / "raw"
    make_idx_set(raw, seed=9, gz=False)
    victim = raw / "t10k-images-idx3-ubyte"
    victim.write_bytes(victim.read_bytes()[:-10])
    with pytest.raises(sources.DataError, match=str(victim)) as info:
        load_dataset(DataConfig(name="mnist", root=str(tmp_path), download=False), CPU)
    assert "truncated" in str(info.value)


def test_corrupt_cifar_batch_names_the_file(tmp_path, monkeypatch, no_system_copy):
    make_cifar_set(tmp_path, "cifar10", seed=10)
    trust_fixture_checksums(monkeypatch, tmp_path, "cifar10")
    victim = tmp_path / "cifar-10-batches-py" / "data_batch_3"
    victim.write_bytes(victim.read_bytes()[:-100])
    with pytest.raises(sources.DataError, match=str(victim)):
        load_dataset(DataConfig(name="cifar10", root=str(tmp_path), download=False), CPU)


@pytest.mark.skipif(not REAL_FMNIST.is_dir(), reason="needs Debian's dataset-fashion-mnist")
def test_real_fashion_mnist_from_the_system_copy(tmp_path):
    data = load_dataset(DataConfig(name="fashion_mnist", root=str(tmp_path / "empty"), download=False,
                                   val_fraction=None), CPU)
    assert data.source == f"Fashion-MNIST from system copy {REAL_FMNIST}"
    assert data.train.x.shape == (60_000, 1, 28, 28) and data.test.x.shape == (10_000, 1, 28, 28)
    assert data.val is None  # the paper's protocol: every training image is trained on
    assert torch.equal(torch.bincount(data.train.y, minlength=10), torch.full((10,), 6000))
    assert torch.equal(torch.bincount(data.test.y, minlength=10), torch.full((10,), 1000))
    # The paper's constants are the training set's own statistics (to the digits given).
    assert abs(data.train.x.mean().item()) < 2e-3 and abs(data.train.x.std().item() - 1) < 2e-3

    held = load_dataset(DataConfig(name="fashion_mnist", root=str(tmp_path / "empty"), download=False), CPU)
    assert torch.equal(torch.bincount(held.train.y, minlength=10), torch.full((10,), 5400))  # 10%, every class
    assert torch.equal(torch.bincount(held.val.y, minlength=10), torch.full((10,), 600))
    assert torch.equal(held.test.x, data.test.x)  # the test set is never touched
    # train + val are exactly the training images, each once (compare as sets of rows)
    rows = lambda x: sorted(map(bytes, x.flatten(1).numpy().view("uint8").reshape(len(x), -1)))  # noqa: E731
    assert rows(torch.cat([held.train.x, held.val.x])) == rows(data.train.x)


def test_stratified_holdout_by_brute_force():
    from raymoe.data.datasets import stratified_holdout

    y = torch.tensor([0] * 7 + [1] * 20 + [2] * 3 + [0] * 3)
    torch.manual_seed(1)
    keep, held = stratified_holdout(y, 0.3)
    torch.manual_seed(2)  # the draw ignores the global seed (every run shares one validation split)
    keep2, held2 = stratified_holdout(y, 0.3)
    assert torch.equal(held, held2) and torch.equal(keep, keep2)
    assert sorted(keep.tolist() + held.tolist()) == list(range(len(y)))  # disjoint and complete
    for c, n in ((0, 10), (1, 20), (2, 3)):
        assert int((y[held] == c).sum()) == round(0.3 * n)


# ---------------------------------------------------------------- batching and augmentation

def _split(n: int, c: int = 3, size: int = 8) -> Split:
    x = torch.arange(n * c * size * size, dtype=torch.float32).view(n, c, size, size).sin()
    return Split(x, torch.arange(n))


@pytest.mark.parametrize("world_size", [2, 3])
@pytest.mark.parametrize("augment", [False, True])
def test_ranks_together_see_the_single_process_batches(world_size, augment):
    split, batch_size = _split(23), 5  # last batch: 3 samples
    single = list(train_batches(split, batch_size, generator=torch.Generator().manual_seed(7), augment=augment))
    assert len(single) == num_train_steps(23, batch_size) == 5 and len(single[-1][1]) == 3
    assert sorted(torch.cat([y for _, y in single]).tolist()) == list(range(23))  # a permutation, nothing dropped
    per_rank = [list(train_batches(split, batch_size, generator=torch.Generator().manual_seed(7), augment=augment,
                                   rank=r, world_size=world_size)) for r in range(world_size)]
    for step, (x, y) in enumerate(single):
        parts = [per_rank[r][step] for r in range(world_size)]
        assert [len(p[1]) for p in parts] == [len(t) for t in torch.arange(len(y)).tensor_split(world_size)]
        assert torch.equal(torch.cat([p[1] for p in parts]), y)
        assert torch.equal(torch.cat([p[0] for p in parts]), x)
    again = list(train_batches(split, batch_size, generator=torch.Generator().manual_seed(8), augment=augment))
    assert not torch.equal(again[0][1], single[0][1])  # another seed, another order


def _reflect(i: int, n: int) -> int:
    return -i if i < 0 else (2 * (n - 1) - i if i >= n else i)


def test_augmentation_equals_per_pixel_reference():
    x = torch.randn(16, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    params = draw_params(16, torch.Generator().manual_seed(3), padding=4)
    got = apply_augment(x, params, padding=4)
    expected = torch.empty_like(x)
    for n in range(16):
        img = x[n].flip(-1) if params.flip_B[n] else x[n]
        top, left = int(params.top_B[n]), int(params.left_B[n])
        for i in range(8):
            for j in range(8):  # padded coordinate (top + i, left + j) -> source pixel by reflection about the edge
                expected[n, :, i, j] = img[:, _reflect(top + i - 4, 8), _reflect(left + j - 4, 8)]
    assert torch.equal(got, expected)
    assert params.flip_B.any() and not params.flip_B.all()
    assert 0 <= int(params.top_B.min()) and int(params.top_B.max()) <= 8


def test_train_batches_augment_with_the_documented_draws():
    split = _split(9)
    gen = torch.Generator().manual_seed(11)
    got = list(train_batches(split, 4, generator=gen, augment=True))
    ref_gen = torch.Generator().manual_seed(11)
    perm = torch.randperm(9, generator=ref_gen)
    for step, (x, y) in enumerate(got):
        idx = perm[step * 4:(step + 1) * 4]
        params = draw_params(len(idx), ref_gen, 4)
        assert torch.equal(y, split.y[idx])
        assert torch.equal(x, apply_augment(split.x[idx], params, 4))
        assert not torch.equal(x, split.x[idx])


def test_identity_params_leave_the_image_unchanged():
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    params = AugmentParams(torch.tensor([False, True]), torch.tensor([4, 4]), torch.tensor([4, 4]))
    out = apply_augment(x, params, 4)
    assert torch.equal(out[0], x[0]) and torch.equal(out[1], x[1].flip(-1))


@pytest.mark.parametrize("world_size", [1, 2, 3, 30])
def test_eval_batches_cover_each_sample_once(world_size):
    split = _split(23)
    seen = []
    for rank in range(world_size):
        mine = [y for _, y in eval_batches(split, 4, rank=rank, world_size=world_size)]
        assert all(len(y) <= 4 for y in mine)
        flat = torch.cat(mine).tolist() if mine else []
        if flat:
            assert flat == list(range(flat[0], flat[0] + len(flat)))  # a contiguous shard
        seen += flat
    assert seen == list(range(23))


def test_batch_size_must_cover_the_workers():
    raw = {"name": "x", "scaling": {"num_workers": 4}, "train": {"batch_size": 3}}
    with pytest.raises(ConfigError) as info:
        load_experiment(raw=raw)
    assert info.value.path == "train.batch_size" and info.value.value == 3
    assert load_experiment(raw={**raw, "train": {"batch_size": 4}}).train.batch_size == 4


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_dataset_and_batches_match_cpu(tmp_path, monkeypatch, no_system_copy):
    make_cifar_set(tmp_path, "cifar100", seed=12)
    trust_fixture_checksums(monkeypatch, tmp_path, "cifar100")
    cfg = DataConfig(name="cifar100", root=str(tmp_path), download=False)
    cpu, gpu = load_dataset(cfg, CPU), load_dataset(cfg, torch.device("cuda"))
    assert gpu.train.x.is_cuda and gpu.test.y.is_cuda
    torch.testing.assert_close(gpu.train.x.cpu(), cpu.train.x, rtol=0, atol=1e-6)
    on_cpu = train_batches(cpu.train, 4, generator=torch.Generator().manual_seed(1), augment=True)
    on_gpu = train_batches(gpu.train, 4, generator=torch.Generator().manual_seed(1), augment=True)
    for (xc, yc), (xg, yg) in zip(on_cpu, on_gpu, strict=True):
        assert torch.equal(yg.cpu(), yc)
        torch.testing.assert_close(xg.cpu(), xc, rtol=0, atol=1e-6)
