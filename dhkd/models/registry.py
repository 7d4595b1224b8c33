"""Model builders by name: backbones for ``DualHeadStudent``, teachers, checkpoint loading."""
from __future__ import annotations

import numbers
import os
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from .cifar import ZOO as CIFAR_ZOO
from .mnist1d import MNIST1DBNCNN, MNIST1DCNN, MNIST1DMLP
from .student import DualHeadStudent

TIMM_PREFIX = "timm:"


@dataclass(frozen=True)
class _Spec:
    """make(num_classes) -> full classifier; head: qualified name of its final Linear."""
    make: Callable[[int], nn.Module]
    head: str
    family: str  # "mnist1d" | "cifar" | "torchvision"


def _torchvision_maker(name: str) -> Callable[..., nn.Module]:
    def make(num_classes: int, weights: str | None = None) -> nn.Module:
        try:
            import torchvision
        except ImportError as exc:
            raise ImportError(f"model {name!r} needs torchvision: pip install torchvision") from exc
        if weights is None:
            return torchvision.models.get_model(name, weights=None, num_classes=num_classes)
        enum = torchvision.models.get_model_weights(name)
        choices = [w.name for w in enum] + ["DEFAULT"]
        short = weights.split(".")[-1]
        if short not in choices:
            raise ValueError(f"weights={weights!r} is not a torchvision weight of {name}; choose from {choices}")
        n_categories = len(enum[short].meta.get("categories") or [])
        if n_categories and n_categories != num_classes:
            raise ValueError(f"weights={weights!r} of {name} has {n_categories} classes, but num_classes={num_classes}")
        return torchvision.models.get_model(name, weights=short)
    return make


_SPECS: dict[str, _Spec] = {
    "mnist1d_mlp": _Spec(lambda c: MNIST1DMLP(num_classes=c), "fc", "mnist1d"),
    "mnist1d_cnn": _Spec(lambda c: MNIST1DCNN(num_classes=c), "fc", "mnist1d"),
    # BatchNorm CNNs of the 100-class experiment: a small student and a wider, deeper teacher
    "mnist1d_bn_cnn": _Spec(lambda c: MNIST1DBNCNN(num_classes=c, channels=32), "fc", "mnist1d"),
    "mnist1d_bn_cnn_wide": _Spec(lambda c: MNIST1DBNCNN(num_classes=c, channels=64, stem=1), "fc", "mnist1d"),
    "resnet18": _Spec(_torchvision_maker("resnet18"), "fc", "torchvision"),
    "resnet34": _Spec(_torchvision_maker("resnet34"), "fc", "torchvision"),
    "resnet50": _Spec(_torchvision_maker("resnet50"), "fc", "torchvision"),
    "mobilenet_v2": _Spec(_torchvision_maker("mobilenet_v2"), "classifier.1", "torchvision"),
}
for _name, (_make, _head) in CIFAR_ZOO.items():
    _SPECS[_name] = _Spec(lambda c, make=_make: make(num_classes=c), _head, "cifar")


def model_names() -> list[str]:
    """Known model names (``timm:<name>`` is accepted on top of these when timm is installed)."""
    return list(_SPECS)


def _unknown(name) -> ValueError:
    return ValueError(f"unknown model name {name!r}; known: {', '.join(model_names())} "
                      f"(and {TIMM_PREFIX}<name> with timm installed)")


def _check_common(name, num_classes) -> int:
    if not isinstance(name, str):
        raise TypeError(f"model name must be a str, got {type(name).__name__}")
    if isinstance(num_classes, bool) or not isinstance(num_classes, numbers.Integral) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
    return int(num_classes)


def _import_timm(name: str):
    try:
        import timm
    except ImportError as exc:
        raise ImportError(f"model {name!r} needs timm, which is not installed: pip install timm") from exc
    return timm


def _head_module(model: nn.Module, head: str) -> nn.Linear:
    return model.get_submodule(head)


def _replace(model: nn.Module, qualname: str, new: nn.Module) -> None:
    parent_name, _, child = qualname.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def _set_in_channels(model: nn.Module, in_channels: int, name: str) -> None:
    """Replace the first Conv2d with one taking ``in_channels`` input channels (fresh weights)."""
    for qualname, module in model.named_modules():
        if isinstance(module, nn.Conv2d):
            if module.in_channels == in_channels:
                return
            if module.groups != 1:
                break
            _replace(model, qualname, nn.Conv2d(
                in_channels, module.out_channels, module.kernel_size, module.stride, module.padding,
                module.dilation, 1, module.bias is not None, module.padding_mode))
            return
    raise ValueError(f"in_channels={in_channels} is not supported for model {name!r}")


def _apply_in_channels(model: nn.Module, spec: _Spec, name: str, in_channels) -> None:
    if in_channels is None:
        return
    if isinstance(in_channels, bool) or not isinstance(in_channels, numbers.Integral) or in_channels < 1:
        raise ValueError(f"in_channels must be a positive int or None, got {in_channels!r}")
    in_channels = int(in_channels)
    if spec.family == "mnist1d":
        if in_channels != 1:
            raise ValueError(f"model {name!r} takes 1-channel signals; got in_channels={in_channels}")
        return
    _set_in_channels(model, in_channels, name)


def build_classifier(name: str, *, num_classes: int, in_channels: int | None = None) -> nn.Module:
    """The full classifier ``name`` (randomly initialised), returning logits (N, num_classes)."""
    num_classes = _check_common(name, num_classes)
    if name.startswith(TIMM_PREFIX):
        timm = _import_timm(name)
        kwargs = {} if in_channels is None else {"in_chans": in_channels}
        return timm.create_model(name[len(TIMM_PREFIX):], pretrained=False, num_classes=num_classes, **kwargs)
    if name not in _SPECS:
        raise _unknown(name)
    spec = _SPECS[name]
    model = spec.make(num_classes)
    _apply_in_channels(model, spec, name, in_channels)
    return model


def build_backbone(name: str, *, num_classes: int, in_channels: int | None = None) -> tuple[nn.Module, int]:
    """(backbone, d): ``backbone(x)`` returns pooled features (N, d).

    It is the full classifier with its final Linear replaced by ``nn.Identity`` (so its parameter names
    are the classifier's, e.g. a torchvision/CIFAR-zoo state dict minus the head loads into it);
    ``num_classes`` only sizes that discarded head. timm models come with ``num_classes=0``.
    """
    num_classes = _check_common(name, num_classes)
    if name.startswith(TIMM_PREFIX):
        timm = _import_timm(name)
        kwargs = {} if in_channels is None else {"in_chans": in_channels}
        model = timm.create_model(name[len(TIMM_PREFIX):], pretrained=False, num_classes=0, **kwargs)
        return model, int(model.num_features)
    model = build_classifier(name, num_classes=num_classes, in_channels=in_channels)
    head = _head_module(model, _SPECS[name].head)
    _replace(model, _SPECS[name].head, nn.Identity())
    return model, int(head.in_features)


def build_student(name: str, *, num_classes: int, aux_head: str = "linear", in_channels: int | None = None,
                  aux_hidden: int = 200, aux_dropout: float = 0.1) -> DualHeadStudent:
    """``DualHeadStudent`` on ``build_backbone(name)`` with a main head and a linear or MLP aux head."""
    if aux_head not in ("linear", "mlp"):
        raise ValueError(f"aux_head must be 'linear' or 'mlp', got {aux_head!r}")
    backbone, d = build_backbone(name, num_classes=num_classes, in_channels=in_channels)
    return DualHeadStudent(backbone, d, num_classes, aux_head=aux_head, aux_hidden=aux_hidden,
                           aux_dropout=aux_dropout)


def _head_name_of(model: nn.Module, name: str) -> str:
    if name in _SPECS:
        return _SPECS[name].head
    classifier = model.get_classifier() if hasattr(model, "get_classifier") else None
    for qualname, module in model.named_modules():
        if module is classifier:
            return qualname
    return ""


def build_teacher(name: str, *, num_classes: int, weights: str | None = None, checkpoint: str | None = None,
                  in_channels: int | None = None) -> nn.Module:
    """A frozen classifier (eval mode, ``requires_grad=False``) returning logits (N, num_classes).

    weights: a torchvision weight name of the model (``"IMAGENET1K_V1"``, ``"DEFAULT"``), downloaded by
    torchvision; for ``timm:<name>`` any value loads timm's pretrained weights. checkpoint: a local file
    holding a state dict, or a dict whose ``model`` (or ``state_dict``) entry holds it (the CRD/RepDistiller
    ``ckpt_epoch_240.pth`` format); a dhkd ``DualHeadStudent``/exported-student state dict also loads
    (its ``backbone.*`` + ``head.*``; the auxiliary head is dropped).
    """
    num_classes = _check_common(name, num_classes)
    if weights is not None and checkpoint is not None:
        raise ValueError("give either weights or checkpoint for a teacher, not both")
    if weights is not None and not isinstance(weights, str):
        raise TypeError(f"weights must be a str or None, got {type(weights).__name__}")
    if name.startswith(TIMM_PREFIX):
        timm = _import_timm(name)
        kwargs = {} if in_channels is None else {"in_chans": in_channels}
        model = timm.create_model(name[len(TIMM_PREFIX):], pretrained=weights is not None,
                                  num_classes=num_classes, **kwargs)
    elif name not in _SPECS:
        raise _unknown(name)
    elif weights is not None:
        spec = _SPECS[name]
        if spec.family != "torchvision":
            raise ValueError(f"weights={weights!r}: named weights exist only for torchvision/timm models; "
                             f"give a checkpoint file for {name!r}")
        if in_channels not in (None, 3):
            raise ValueError(f"in_channels={in_channels} does not fit pretrained weights of {name!r}")
        model = spec.make(num_classes, weights=weights)
    else:
        model = build_classifier(name, num_classes=num_classes, in_channels=in_channels)
    if checkpoint is not None:
        load_checkpoint_into(model, checkpoint, head=_head_name_of(model, name))
    model.eval()
    model.requires_grad_(False)
    return model


def read_state_dict(path) -> dict[str, torch.Tensor]:
    """The state dict in ``path`` (plain, or under a ``model``/``state_dict`` key), on the CPU."""
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"checkpoint must be a path, got {type(path).__name__}")
    from ..rundir import CheckpointError, read_checkpoint_file
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    try:
        obj = read_checkpoint_file(path)
    except CheckpointError as exc:
        raise ValueError(str(exc)) from exc.__cause__
    if isinstance(obj, dict):
        for key in ("model", "state_dict"):
            if key in obj and isinstance(obj[key], dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not obj or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()):
        kind = sorted(obj)[:8] if isinstance(obj, dict) else type(obj).__name__
        raise ValueError(f"checkpoint {path} holds no state dict (a dict of name -> tensor, itself or under a "
                         f"'model' key); found {kind}")
    return obj


def _adapt_keys(state: dict[str, torch.Tensor], model_keys: set[str], head: str) -> dict[str, torch.Tensor]:
    if state and all(k.startswith("module.") for k in state) and not any(k.startswith("module.") for k in model_keys):
        state = {k[len("module."):]: v for k, v in state.items()}
    if any("_orig_mod." in k for k in state) and not any("_orig_mod." in k for k in model_keys):
        state = {k.replace("_orig_mod.", ""): v for k, v in state.items()}
    is_student = "head.weight" in state and any(k.startswith("backbone.") for k in state)
    if is_student and head and not any(k.startswith("backbone.") for k in model_keys):
        adapted = {}
        for k, v in state.items():
            if k.startswith("backbone."):
                adapted[k[len("backbone."):]] = v
            elif k.startswith("head."):
                adapted[f"{head}.{k[len('head.'):]}"] = v
        state = adapted
    return state


def load_checkpoint_into(model: nn.Module, path, *, head: str = "") -> nn.Module:
    """Load the state dict in ``path`` into ``model`` strictly; ValueError naming the file and the
    missing / unexpected / mis-shaped keys when they do not match."""
    state = read_state_dict(path)
    expected = model.state_dict()
    state = _adapt_keys(state, set(expected), head)
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
              for k in expected if k in state and state[k].shape != expected[k].shape]
    if missing or unexpected or shapes:
        def few(items):
            return ", ".join(items[:5]) + (f" (+{len(items) - 5} more)" if len(items) > 5 else "")
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys: {few(missing)}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys: {few(unexpected)}")
        if shapes:
            parts.append(f"{len(shapes)} shape mismatches: {few(shapes)}")
        raise ValueError(f"checkpoint {os.fspath(path)} does not match {type(model).__name__}: " + "; ".join(parts))
    model.load_state_dict(state, strict=True)
    return model
