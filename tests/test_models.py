"""Models: builders by name, the dual-head student and its export, teacher checkpoint loading."""
import argparse

import pytest
import torch
from torch import nn

from dhkd.models import (DualHeadStudent, build_backbone, build_classifier, build_student, build_teacher,
                         model_names)
from dhkd.models.cifar import ZOO
from dhkd_kernels import fused_dual_head_kd_loss

MNIST1D = ["mnist1d_mlp", "mnist1d_cnn", "mnist1d_bn_cnn", "mnist1d_bn_cnn_wide"]
IMAGENET = ["resnet18", "resnet34", "resnet50", "mobilenet_v2"]
CIFAR = [n for n in model_names() if n not in MNIST1D + IMAGENET]


def _input(name, n=2):
    g = torch.Generator().manual_seed(0)
    if name in MNIST1D:
        return torch.randn(2 * n, 40, generator=g)
    size = 64 if name in IMAGENET else 32
    return torch.randn(n, 3, size, size, generator=g)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.mark.parametrize("name", MNIST1D + IMAGENET)
def test_backbone_and_classifier_shapes(name):
    x = _input(name)
    backbone, d = build_backbone(name, num_classes=7)
    backbone.eval()
    with torch.no_grad():
        feats = backbone(x)
        logits = build_classifier(name, num_classes=7).eval()(x)
    assert feats.shape == (x.shape[0], d)
    assert logits.shape == (x.shape[0], 7)
    assert not any(m.out_features == 7 for m in backbone.modules() if isinstance(m, nn.Linear))


def test_mnist1d_accepts_channel_dim():
    for name in MNIST1D:
        model = build_classifier(name, num_classes=10).eval()
        x = torch.randn(3, 40)
        torch.testing.assert_close(model(x), model(x.unsqueeze(1)))


@pytest.mark.parametrize("aux_head", ["linear", "mlp"])
@pytest.mark.parametrize("name", ["mnist1d_cnn", "resnet18"])
def test_student_forward_export(name, aux_head):
    s = build_student(name, num_classes=10, aux_head=aux_head)
    assert isinstance(s, DualHeadStudent)
    x = _input(name, n=3)
    feats, aux = s.forward_features(x)
    assert feats.shape == (x.shape[0], s.num_features)
    if aux_head == "mlp":
        assert aux.shape == (x.shape[0], 200)
        assert s.aux_head.in_features == 200 and isinstance(s.aux_mlp, nn.Sequential)
    else:
        assert aux is None and s.aux_mlp is None
        assert s.aux_head.in_features == s.num_features
    assert s.aux_logits(feats, aux).shape == (x.shape[0], 10)
    s.eval()
    exported = s.export_student()
    assert not exported.training
    with torch.no_grad():
        torch.testing.assert_close(exported(x), s(x), rtol=0, atol=0)
        torch.testing.assert_close(s(x), s.head(s.forward_features(x)[0]), rtol=0, atol=0)
    keys = exported.state_dict().keys()
    assert not any(k.startswith(("aux_head", "aux_mlp")) for k in keys)
    assert sum(p.numel() for p in exported.parameters()) == (
        sum(p.numel() for p in s.backbone.parameters()) + sum(p.numel() for p in s.head.parameters()))


def test_student_export_is_independent():
    s = build_student("mnist1d_mlp", num_classes=10)
    exported = s.export_student()
    with torch.no_grad():
        s.head.weight.add_(1.0)
    assert not torch.equal(exported.head.weight, s.head.weight)


@pytest.mark.parametrize("aux_head", ["linear", "mlp"])
def test_fused_loss_accepts_student_tensors(aux_head):
    s = build_student("mnist1d_mlp", num_classes=10, aux_head=aux_head)
    x = torch.randn(8, 40)
    y = torch.randint(0, 10, (8,))
    t = torch.randn(8, 10)
    feat, aux = s.forward_features(x)
    loss = fused_dual_head_kd_loss(feat, s.head.weight, s.head.bias, s.aux_head.weight, s.aux_head.bias, t, y,
                                   aux_features=aux, backend="torch")
    assert loss.dim() == 0 and torch.isfinite(loss)
    loss.backward()
    for p in (s.head.weight, s.head.bias, s.aux_head.weight, s.aux_head.bias):
        assert p.grad is not None and p.grad.abs().sum() > 0
    first = next(s.backbone.parameters())
    assert first.grad is not None and first.grad.abs().sum() > 0
    if aux_head == "mlp":
        assert s.aux_mlp[0].weight.grad.abs().sum() > 0


def test_unknown_names():
    with pytest.raises(ValueError, match="no_such_net.*known.*resnet18"):
        build_backbone("no_such_net", num_classes=10)
    with pytest.raises(ValueError, match="no_such_net"):
        build_teacher("no_such_net", num_classes=10)
    with pytest.raises(ValueError, match="'wide'"):
        build_student("mnist1d_mlp", num_classes=10, aux_head="wide")
    with pytest.raises(ValueError, match="'wide'"):
        DualHeadStudent(nn.Identity(), 4, 3, aux_head="wide")
    with pytest.raises(ValueError, match="num_classes"):
        build_backbone("resnet18", num_classes=0)


def test_timm_prefix():
    try:
        import timm  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="timm"):
            build_backbone("timm:resnet18", num_classes=10)
        return
    backbone, d = build_backbone("timm:resnet18", num_classes=10)
    assert backbone.eval()(torch.randn(2, 3, 64, 64)).shape == (2, d)


def test_in_channels():
    backbone, d = build_backbone("resnet18", num_classes=10, in_channels=1)
    assert backbone.eval()(torch.randn(2, 1, 64, 64)).shape == (2, d)
    with pytest.raises(ValueError, match="in_channels"):
        build_backbone("mnist1d_cnn", num_classes=10, in_channels=3)


def test_teacher_frozen_eval():
    t = build_teacher("mnist1d_cnn", num_classes=10)
    assert not t.training
    assert all(not p.requires_grad for p in t.parameters())
    assert t(torch.randn(4, 40)).shape == (4, 10)


def test_teacher_bad_weights_name():
    with pytest.raises(ValueError, match="NOPE.*IMAGENET1K_V1"):
        build_teacher("resnet18", num_classes=1000, weights="NOPE")
    with pytest.raises(ValueError, match="checkpoint"):
        build_teacher("mnist1d_cnn", num_classes=10, weights="IMAGENET1K_V1")


def _save(obj, path):
    torch.save(obj, path)
    return str(path)


def test_teacher_checkpoint_roundtrip_mnist1d(tmp_path):
    src = build_classifier("mnist1d_cnn", num_classes=10).eval()
    path = _save({"epoch": 3, "model": src.state_dict(), "accuracy": torch.tensor(90.0)}, tmp_path / "ckpt.pth")
    t = build_teacher("mnist1d_cnn", num_classes=10, checkpoint=path)
    x = torch.randn(5, 40)
    torch.testing.assert_close(t(x), src(x), rtol=0, atol=0)
    plain = _save(src.state_dict(), tmp_path / "plain.pt")
    torch.testing.assert_close(build_teacher("mnist1d_cnn", num_classes=10, checkpoint=plain)(x), src(x),
                               rtol=0, atol=0)


@pytest.mark.parametrize("aux_head", ["linear", "mlp"])
def test_teacher_from_student_checkpoint(tmp_path, aux_head):
    s = build_student("mnist1d_mlp", num_classes=10, aux_head=aux_head).eval()
    path = _save({"model": s.state_dict()}, tmp_path / "student.pt")
    t = build_teacher("mnist1d_mlp", num_classes=10, checkpoint=path)
    x = torch.randn(5, 40)
    torch.testing.assert_close(t(x), s(x), rtol=0, atol=0)
    exported = _save(s.export_student().state_dict(), tmp_path / "exported.pt")
    torch.testing.assert_close(build_teacher("mnist1d_mlp", num_classes=10, checkpoint=exported)(x), s(x),
                               rtol=0, atol=0)


def test_checkpoint_errors(tmp_path):
    missing = str(tmp_path / "nope.pth")
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        build_teacher("mnist1d_mlp", num_classes=10, checkpoint=missing)

    src = build_classifier("mnist1d_mlp", num_classes=10)
    good = _save({"model": src.state_dict()}, tmp_path / "good.pth")
    data = open(good, "rb").read()
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated.pth.*truncated or corrupt"):
        build_teacher("mnist1d_mlp", num_classes=10, checkpoint=str(truncated))

    renamed = {k.replace("features.", "body."): v for k, v in src.state_dict().items()}
    wrong = _save({"model": renamed}, tmp_path / "wrong.pth")
    with pytest.raises(ValueError, match=r"wrong.pth.*missing keys: features\.0\.weight.*unexpected keys: body"):
        build_teacher("mnist1d_mlp", num_classes=10, checkpoint=wrong)

    with pytest.raises(ValueError, match=r"good.pth.*shape mismatches: fc\.weight"):
        build_teacher("mnist1d_mlp", num_classes=100, checkpoint=good)

    pickled = _save({"opt": argparse.Namespace(lr=0.05), "model": src.state_dict()}, tmp_path / "resnet_last.pth")
    with pytest.raises(ValueError, match="resnet_last.pth.*weights_only"):
        build_teacher("mnist1d_mlp", num_classes=10, checkpoint=pickled)

    other = _save({"epoch": 1, "acc": 3.0}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match="other.pth.*no state dict"):
        build_teacher("mnist1d_mlp", num_classes=10, checkpoint=other)


# Parameter counts of the CIFAR-100 classifiers as tabulated in the KD literature (CRD, mdistiller), in M.
LITERATURE_PARAMS_M = {"resnet8x4": 1.23, "resnet32x4": 7.43, "resnet20": 0.28, "resnet32": 0.47, "resnet56": 0.86,
                       "resnet110": 1.74, "ResNet50": 23.71, "wrn_40_2": 2.26, "wrn_40_1": 0.57, "wrn_16_2": 0.70,
                       "vgg13": 9.46, "vgg8": 3.96, "MobileNetV2": 0.81, "ShuffleV1": 0.95, "ShuffleV2": 1.36}

# A few parameter names from the literature's checkpoints, per model (with its final Linear).
CHECKPOINT_KEYS = {
    "resnet32x4": ["conv1.weight", "layer1.0.downsample.0.weight", "layer3.4.bn2.running_var", "fc.weight"],
    "resnet56": ["layer2.0.downsample.1.weight", "layer3.8.conv2.weight", "fc.bias"],
    "ResNet50": ["layer4.2.bn3.weight", "layer1.0.shortcut.0.weight", "linear.weight"],
    "wrn_40_2": ["block1.layer.0.convShortcut.weight", "block3.layer.5.conv2.weight", "bn1.weight", "fc.weight"],
    "vgg13": ["block0.0.weight", "block0.4.running_mean", "block4.3.bias", "classifier.weight"],
    "vgg8": ["block0.0.bias", "block4.1.num_batches_tracked", "classifier.bias"],
    "MobileNetV2": ["conv1.0.weight", "blocks.0.0.conv.0.weight", "blocks.6.0.conv.7.weight", "conv2.1.weight",
                    "classifier.0.weight"],
    "ShuffleV1": ["layer1.0.conv1.weight", "layer3.3.bn3.weight", "linear.weight"],
    "ShuffleV2": ["layer1.0.conv5.weight", "layer2.7.bn3.weight", "conv2.weight", "bn2.weight", "linear.weight"],
}


def test_cifar_zoo_is_complete():
    expected = {"resnet8x4", "resnet32x4", "resnet20", "resnet56", "resnet110", "resnet32", "wrn_40_2", "wrn_16_2",
                "wrn_40_1", "vgg13", "vgg8", "MobileNetV2", "ShuffleV1", "ShuffleV2"}
    assert expected <= set(CIFAR)
    assert set(CIFAR) == set(LITERATURE_PARAMS_M)


@pytest.mark.parametrize("name", CIFAR)
def test_cifar_zoo(name):
    model = build_classifier(name, num_classes=100)
    n_params = sum(p.numel() for p in model.parameters()) / 1e6
    assert abs(n_params - LITERATURE_PARAMS_M[name]) < 0.006, n_params
    keys = model.state_dict().keys()
    for key in CHECKPOINT_KEYS.get(name, []):
        assert key in keys
    assert ZOO[name][1] == model.head_name
    assert isinstance(model.final_linear, nn.Linear) and model.final_linear.out_features == 100
    x = _input(name)
    model.eval()
    with torch.no_grad():
        logits = model(x)
        feats = model.forward_features(x)
    assert logits.shape == (2, 100) and feats.shape == (2, model.num_features)
    torch.testing.assert_close(model.final_linear(feats), logits)

    backbone, d = build_backbone(name, num_classes=100)
    assert d == model.num_features
    s = DualHeadStudent(backbone, d, 100, aux_head="mlp").eval()
    with torch.no_grad():
        f, aux = s.forward_features(x)
    assert f.shape == (2, d) and aux.shape == (2, 200)


@pytest.mark.parametrize("name", ["resnet8x4", "wrn_16_2", "MobileNetV2", "ShuffleV2"])
def test_zoo_teacher_checkpoint_roundtrip(tmp_path, name):
    src = build_classifier(name, num_classes=100)
    src.train()
    with torch.no_grad():
        src(torch.randn(4, 3, 32, 32))  # move the BatchNorm running statistics away from their defaults
    src.eval()
    path = _save({"epoch": 240, "model": src.state_dict(), "accuracy": torch.tensor(71.2),
                  "optimizer": {"state": {}, "param_groups": [{"lr": 0.05, "params": [0]}]}},
                 tmp_path / f"{name}_vanilla_ckpt_epoch_240.pth")
    t = build_teacher(name, num_classes=100, checkpoint=path)
    assert not t.training and not any(p.requires_grad for p in t.parameters())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(t(x), src(x), rtol=0, atol=0)


def test_student_backbone_takes_zoo_weights(tmp_path):
    src = build_classifier("resnet20", num_classes=100).eval()
    s = build_student("resnet20", num_classes=100, aux_head="linear").eval()
    state = {k: v for k, v in src.state_dict().items() if not k.startswith("fc.")}
    s.backbone.load_state_dict(state)
    s.head.load_state_dict(src.fc.state_dict())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(s(x), src(x), rtol=0, atol=0)


def test_teacher_weights_class_count_checked_before_download():
    with pytest.raises(ValueError, match="1000 classes.*num_classes=10"):
        build_teacher("resnet18", num_classes=10, weights="IMAGENET1K_V1")


def test_teacher_from_wrapped_state_dicts(tmp_path):
    src = build_classifier("mnist1d_mlp", num_classes=10).eval()
    x = torch.randn(3, 40)
    ddp = _save({f"module.{k}": v for k, v in src.state_dict().items()}, tmp_path / "ddp.pt")
    torch.testing.assert_close(build_teacher("mnist1d_mlp", num_classes=10, checkpoint=ddp)(x), src(x))
    s = build_student("mnist1d_mlp", num_classes=10).eval()
    compiled = {k.replace("backbone.", "backbone._orig_mod."): v for k, v in s.state_dict().items()}
    path = _save({"model": compiled}, tmp_path / "compiled.pt")
    torch.testing.assert_close(build_teacher("mnist1d_mlp", num_classes=10, checkpoint=path)(x), s(x))


@pytest.mark.parametrize("name", ["resnet8x4", "ShuffleV1", "ShuffleV2", "MobileNetV2"])
def test_zoo_channels_last_and_bf16_autocast(name):
    model = build_classifier(name, num_classes=100).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = model(x)
        cl = model.to(memory_format=torch.channels_last)(x.to(memory_format=torch.channels_last))
        torch.testing.assert_close(cl, ref, rtol=1e-4, atol=1e-5)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model(x)
    assert low.shape == ref.shape and torch.isfinite(low).all()


def test_numpy_int_arguments():
    import numpy as np
    s = build_student("mnist1d_mlp", num_classes=np.int64(10))
    assert s.head.out_features == 10 and isinstance(s.num_classes, int)
