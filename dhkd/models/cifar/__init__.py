"""The CIFAR-100 model zoo of the KD literature (CRD / RepDistiller), 32x32 inputs.

Parameter names match that literature's checkpoints (``<name>_vanilla/ckpt_epoch_240.pth``, a dict whose
``model`` entry is the state dict). Each model has ``forward_features`` (pooled features),
``num_features``, ``head_name`` and ``final_linear``.
"""
from .common import CifarClassifier
from .mobilenetv2 import MobileNetV2, mobilenetv2
from .resnet import CifarResNet, CifarResNet50, resnet8x4, resnet20, resnet32, resnet32x4, resnet56, resnet110
from .shufflenet import ShuffleNetV1, ShuffleNetV2
from .vgg import VGG, vgg8, vgg13
from .wrn import WideResNet, wrn_16_2, wrn_40_1, wrn_40_2

# name -> (constructor taking num_classes, qualified name of the final Linear)
ZOO = {
    "resnet8x4": (resnet8x4, "fc"),
    "resnet32x4": (resnet32x4, "fc"),
    "resnet20": (resnet20, "fc"),
    "resnet32": (resnet32, "fc"),
    "resnet56": (resnet56, "fc"),
    "resnet110": (resnet110, "fc"),
    "ResNet50": (CifarResNet50, "linear"),
    "wrn_40_2": (wrn_40_2, "fc"),
    "wrn_40_1": (wrn_40_1, "fc"),
    "wrn_16_2": (wrn_16_2, "fc"),
    "vgg13": (vgg13, "classifier"),
    "vgg8": (vgg8, "classifier"),
    "MobileNetV2": (mobilenetv2, "classifier.0"),
    "ShuffleV1": (ShuffleNetV1, "linear"),
    "ShuffleV2": (ShuffleNetV2, "linear"),
}

__all__ = ["ZOO", "CifarClassifier", "CifarResNet", "CifarResNet50", "WideResNet", "VGG", "MobileNetV2",
           "ShuffleNetV1", "ShuffleNetV2"]
