"""The ImageFolder input backends (data.backend: torchvision | gpu-decode | dali) on CPU, on a small
folder of real JPEG files of ImageNet-like sizes made here."""
from __future__ import annotations

import shutil

import pytest
import torch

from dhkd.config import ConfigError, load_config
from dhkd.data import build_data
from dhkd.data.fake_images import make_jpeg_folder
from dhkd.data.images import BadImageError, image_list, train_params

from .trainer_helpers import CONFIGS, FAST

try:
    import nvidia.dali  # noqa: F401
    HAVE_DALI = True
except ImportError:
    HAVE_DALI = False

NEEDS_DALI = pytest.mark.skipif(not HAVE_DALI, reason="NVIDIA DALI is not installed (pip install -e '.[dali]')")
BACKENDS = ["torchvision", "gpu-decode", pytest.param("dali", marks=NEEDS_DALI)]
CLASSES, TRAIN_PER, VAL_PER, SIZE, BATCH = 3, 6, 3, 32, 4


@pytest.fixture(autouse=True)
def one_torch_thread():
    """These pipelines run many small ops: on a shared 2-core CPU two spinning intra-op threads made one
    trainer test 60x slower (121 s instead of 2 s); one thread keeps the tests' time steady."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("jpeg_folder")
    make_jpeg_folder(root, classes=CLASSES, train_per_class=TRAIN_PER, val_per_class=VAL_PER, seed=1)
    return root


def config(root, backend, *extra):
    return load_config(CONFIGS / "imagenet/r34_r18_dhkd.yaml", FAST + [
        f"data.root={root}", f"data.num_classes={CLASSES}", f"data.image_size={SIZE}",
        f"data.batch_size={BATCH}", "data.workers=0", f"data.backend={backend}", "teacher.weights=null",
        "teacher.random_init=true", "train.compile=false", *extra])


def epoch_batches(loader, epoch, limit=None):
    loader.set_epoch(epoch)
    out = []
    for x, y in loader:
        out.append((x.contiguous().clone(), y.clone()))
        if limit is not None and len(out) == limit:
            break
    return out


def same(a, b) -> bool:
    return len(a) == len(b) and all(torch.equal(x, u) and torch.equal(y, v) for (x, y), (u, v) in zip(a, b))


def test_crop_draws_are_torchvision_draws():
    """train_params draws what RandomResizedCrop.get_params + RandomHorizontalFlip draw under manual_seed."""
    from torchvision.transforms import RandomResizedCrop
    for s in range(120):
        h, w = [(375, 500), (500, 375), (60, 1000), (1000, 60), (32, 32), (7, 300)][s % 6]
        torch.manual_seed(s)
        ref = RandomResizedCrop.get_params(torch.empty(3, h, w), [0.08, 1.0], [3 / 4, 4 / 3])
        flip = bool(torch.rand(1) < 0.5)
        assert train_params(h, w, torch.Generator().manual_seed(s)) == (*ref, flip)


@pytest.mark.parametrize("backend", BACKENDS)
def test_backend_shapes_labels_and_class_map(folder, backend):
    from torchvision.datasets import ImageFolder
    data = build_data(config(folder, backend))
    expected = ImageFolder(str(folder / "train")).class_to_idx
    assert image_list(str(folder / "train")).class_to_idx == expected
    assert data.classes == sorted(expected, key=expected.get) and data.num_train == CLASSES * TRAIN_PER
    assert backend in data.note
    files = image_list(str(folder / "train")).samples
    batches = epoch_batches(data.train, 0)
    assert len(batches) == len(data.train) == CLASSES * TRAIN_PER // BATCH
    order = data.train.sampler.indices().tolist()
    for b, (x, y) in enumerate(batches):
        assert x.shape == (BATCH, 3, SIZE, SIZE) and x.dtype == torch.uint8 and y.dtype == torch.int64
        assert y.tolist() == [files[i][1] for i in order[b * BATCH:(b + 1) * BATCH]]
        assert x.float().std() > 10  # real image content, not a blank
    val = epoch_batches(data.val, 0)
    assert sum(len(y) for _, y in val) == CLASSES * VAL_PER
    assert torch.cat([y for _, y in val]).tolist() == [s[1] for s in image_list(str(folder / "val")).samples]
    assert all(x.shape[1:] == (3, SIZE, SIZE) and x.dtype == torch.uint8 for x, _ in val)
    x = data.prepare(batches[0][0], torch.device("cpu"), channels_last=True)
    assert x.dtype == torch.float32 and x.is_contiguous(memory_format=torch.channels_last)


def test_torchvision_and_gpu_decode_give_identical_batches(folder):
    """Same (seed, epoch): the same crops, flips and pixels (on CPU), whatever the worker count."""
    tv = build_data(config(folder, "torchvision", "data.workers=2"))
    gd = build_data(config(folder, "gpu-decode"))
    for epoch in (0, 1):
        a, b = epoch_batches(tv.train, epoch), epoch_batches(gd.train, epoch)
        assert same(a, b)
    assert not same(epoch_batches(tv.train, 0), epoch_batches(tv.train, 1))
    assert same(epoch_batches(tv.val, 0), epoch_batches(gd.val, 0))


def test_gpu_decode_prefetch_thread(folder):
    """The CUDA path's background thread (run here on the CPU): the same batches; stopping early is clean."""
    gd = build_data(config(folder, "gpu-decode"))
    plain = epoch_batches(gd.train, 1)
    gd.train.threaded = True
    assert same(epoch_batches(gd.train, 1), plain)
    assert same(epoch_batches(gd.train, 1, limit=1), plain[:1])


@pytest.mark.parametrize("backend", BACKENDS)
def test_resume_sees_the_batches_of_an_uninterrupted_run(folder, backend):
    straight = build_data(config(folder, backend))
    runs = {e: epoch_batches(straight.train, e) for e in (0, 1, 2)}
    assert not same(runs[1], runs[2])
    interrupted = build_data(config(folder, backend))
    epoch_batches(interrupted.train, 0, limit=1)  # died inside epoch 0 (or train.max_steps_per_epoch)
    assert same(epoch_batches(interrupted.train, 1), runs[1])
    resumed = build_data(config(folder, backend))  # a new process resuming at epoch 2
    assert same(epoch_batches(resumed.train, 2), runs[2])
    assert same(epoch_batches(resumed.train, 0), runs[0])


@pytest.mark.parametrize("backend", BACKENDS)
def test_ranks_shard_train_and_see_val_once(folder, backend):
    c = config(folder, backend, "data.batch_size=2")
    ranks = [build_data(c, rank=r, world_size=2) for r in range(2)]
    train = [ranks[r].train.sampler.indices().tolist() for r in range(2)]
    assert not set(train[0]) & set(train[1]) and len(train[0]) == len(train[1]) == CLASSES * TRAIN_PER // 2
    labels = image_list(str(folder / "train")).samples
    for r in range(2):
        got = torch.cat([y for _, y in epoch_batches(ranks[r].train, 0)]).tolist()
        assert got == [labels[i][1] for i in train[r][:len(got)]] and len(got) == len(ranks[r].train) * 2
    val = [torch.cat([y for _, y in epoch_batches(ranks[r].val, 0)]) for r in range(2)]
    assert sum(len(v) for v in val) == CLASSES * VAL_PER  # every validation image once across ranks
    assert sorted(torch.cat(val).tolist()) == sorted(s[1] for s in image_list(str(folder / "val")).samples)


def broken_folder(folder, tmp_path, kinds=("truncated",)):
    root = tmp_path / "broken"
    shutil.copytree(folder, root)
    victims = sorted((root / "train" / "class001").glob("*.JPEG"))
    bad = []
    for kind, path in zip(kinds, victims):
        raw = path.read_bytes()
        path.write_bytes({"truncated": raw[: len(raw) // 3], "garbage": b"\xff\xd8\xff" + bytes(range(256)) * 8,
                          "empty": b""}[kind])
        bad.append(str(path))
    return root, bad


@pytest.mark.parametrize("backend,workers", [("torchvision", 0), ("torchvision", 1), ("gpu-decode", 0),
                                             pytest.param("dali", 0, marks=NEEDS_DALI)])
def test_bad_image_error_names_the_file(folder, tmp_path, backend, workers):
    root, bad = broken_folder(folder, tmp_path, ("garbage",))
    data = build_data(config(root, backend, f"data.workers={workers}"))
    with pytest.raises(BadImageError, match=bad[0]):
        epoch_batches(data.train, 0)
    _KEEP.append(data)  # a DataLoader that raised takes 5 s to stop its workers: not inside the tests


_KEEP = []


@pytest.mark.parametrize("backend", ["torchvision", "gpu-decode"])
def test_bad_images_skipped_with_a_count(folder, tmp_path, capsys, backend):
    root, bad = broken_folder(folder, tmp_path, ("truncated", "garbage", "empty"))
    data = build_data(config(root, backend, "data.bad_images=skip"))
    batches = epoch_batches(data.train, 0)
    assert len(batches) == len(data.train) and all(x.shape == (BATCH, 3, SIZE, SIZE) for x, _ in batches)
    assert sorted(data.train.skipped) == sorted(bad)
    err = capsys.readouterr().err
    assert all(p in err for p in bad) and "3 distinct so far" in err
    again = epoch_batches(data.train, 0)  # deterministic replacement; each file is logged once
    assert same(batches, again) and not any(p in capsys.readouterr().err for p in bad)


@pytest.mark.parametrize("backend", BACKENDS)
def test_cmyk_gray_and_png_named_jpeg(folder, tmp_path, backend):
    """ImageNet's odd files: CMYK and grayscale JPEGs, a PNG with a .JPEG name; all come out RGB."""
    from PIL import Image
    root = tmp_path / "odd"
    shutil.copytree(folder, root)
    victims = sorted((root / "train" / "class000").glob("*.JPEG"))
    for (mode, fmt), path in zip([("CMYK", "JPEG"), ("L", "JPEG"), ("RGB", "PNG")], victims):
        with Image.open(path) as im:
            im.convert(mode).save(path, format=fmt)
    data = build_data(config(root, backend))
    batches = epoch_batches(data.train, 0)
    assert len(batches) == len(data.train) and all(x.shape == (BATCH, 3, SIZE, SIZE) for x, _ in batches)


def test_backend_config_errors():
    with pytest.raises(ConfigError, match="data.backend must be one of"):
        load_config(CONFIGS / "imagenet/r34_r18_dhkd.yaml", ["data.backend=ffcv"])
    with pytest.raises(ConfigError, match="data.bad_images=skip is not available with data.backend=dali"):
        load_config(CONFIGS / "imagenet/r34_r18_dhkd.yaml", ["data.backend=dali", "data.bad_images=skip"])
    with pytest.raises(ConfigError, match="data.bad_images must be one of"):
        load_config(CONFIGS / "imagenet/r34_r18_dhkd.yaml", ["data.bad_images=ignore"])
    with pytest.raises(ConfigError, match="data.prefetch must be > 0"):
        load_config(CONFIGS / "imagenet/r34_r18_dhkd.yaml", ["data.prefetch=0"])


def test_val_classes_must_match_train(folder, tmp_path):
    root = tmp_path / "mismatch"
    shutil.copytree(folder, root)
    (root / "val" / "class002").rename(root / "val" / "class009")
    with pytest.raises(ValueError, match="different class folders"):
        build_data(config(root, "torchvision"))


@NEEDS_DALI
def test_trainer_resume_with_dali(folder, tmp_path):
    """1 epoch + a resumed epoch ends with the weights of 2 epochs straight with DALI's own augmentation,
    and the log says what the backend guarantees. (The other backends' batches are functions of
    (seed, epoch, i): test_resume_sees_the_batches_of_an_uninterrupted_run, test_train's resume tests.)"""
    backend = "dali"
    from dhkd.train import Trainer
    logs = []
    small = ["student.name=resnet18", "teacher.name=resnet18", "train.eval_teacher=false"]
    c = config(folder, backend, "train.epochs=2", *small)
    straight = Trainer(c, tmp_path / "straight", log=logs.append)
    straight.fit()
    assert any(line.startswith("[dhkd] data: dali") and "resume is exact at epoch boundaries" in line
               for line in logs)
    c1 = config(folder, backend, "train.epochs=2", "train.stop_after_epoch=1", *small)
    Trainer(c1, tmp_path / "split", log=logs.append).fit()
    resumed = Trainer(c, tmp_path / "split", resume=True, log=logs.append)
    resumed.fit()
    for p, q in zip(straight.student.state_dict().values(), resumed.student.state_dict().values()):
        assert torch.equal(p, q)


def test_bench_data_command(tmp_path, monkeypatch, capsys):
    from dhkd.cli import main
    monkeypatch.setenv("DHKD_CACHE", str(tmp_path))
    assert main(["bench-data", "--images", "8", "--epochs", "1", "--workers", "0", "--backends", "torchvision",
                 "gpu-decode", "--image-size", "32", "--batch-size", "4", "--json", str(tmp_path / "b.json")]) == 0
    out = capsys.readouterr().out
    assert "| pil_decode_rrc |" in out and "| torchvision | 0 | cpu |" in out and "| gpu-decode | 0 | cpu |" in out
    assert "cores for 11,000 img/s" in out and (tmp_path / "b.json").is_file()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("backend", ["gpu-decode", pytest.param("dali", marks=NEEDS_DALI)])
def test_gpu_backends_on_cuda(folder, backend):
    """On CUDA: uint8 batches on the GPU with the CPU run's labels; gpu-decode's pixels close to the CPU's
    (nvJPEG and the GPU resize differ from libjpeg-turbo and the CPU kernel in the last bits)."""
    cuda = torch.device("cuda")
    on_gpu = build_data(config(folder, backend, "train.device=cuda"), device=cuda)
    on_cpu = build_data(config(folder, backend))
    a, b = epoch_batches(on_gpu.train, 1), epoch_batches(on_cpu.train, 1)
    assert len(a) == len(b) and all(x.device.type == "cuda" and x.dtype == torch.uint8 for x, _ in a)
    assert all(torch.equal(y.cpu(), v) for (_, y), (_, v) in zip(a, b))
    if backend == "gpu-decode":
        diff = torch.stack([(x.cpu().float() - u.float()).abs().mean() for (x, _), (u, _) in zip(a, b)])
        assert diff.max() < 3, diff
    assert sum(len(y) for _, y in epoch_batches(on_gpu.val, 0)) == CLASSES * VAL_PER


def test_dali_skip_is_one_of_the_collected_config_problems():
    """The trainer reports every config problem at once; the dali + skip check raised on its own and ended
    the collection, hiding the problems checked after it (loss, optim, train)."""
    with pytest.raises(ConfigError) as info:
        load_config(CONFIGS / "imagenet/r34_r18_dhkd.yaml", ["data.root=/x", "data.backend=dali",
                                                             "data.bad_images=skip", "optim.lr=-1",
                                                             "train.epochs=0"])
    problems = info.value.problems
    assert len(problems) == 3 and "data.bad_images=skip is not available" in problems[0]
    assert any("optim.lr must be > 0" in p for p in problems) and any("train.epochs must be > 0" in p for p in problems)


def test_data_root_expands_like_the_preflight(folder, tmp_path, monkeypatch):
    """data.root with $VAR and {cache}: the loaders read the folder the start-up checks looked at."""
    from dhkd.preflight import start_problems
    monkeypatch.setenv("DHKD_TEST_ROOT", str(folder.parent))
    cfg = config(f"$DHKD_TEST_ROOT/{folder.name}", "torchvision")
    assert start_problems(cfg, tmp_path / "run") == []
    data = build_data(cfg)
    assert data.num_train == len(image_list(str(folder / "train")).samples)
    monkeypatch.setenv("DHKD_CACHE", str(tmp_path / "cache"))
    c = load_config(CONFIGS / "mnist1d/ce.yaml", ["data.root='{cache}/m1d'", "data.mnist1d_samples=400"])
    build_data(c)
    assert list((tmp_path / "cache" / "m1d").glob("*.npz"))
