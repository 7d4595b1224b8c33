"""Models: the dual-head student, MNIST-1D and CIFAR-100 (KD literature) models, builders by name."""
from .mnist1d import MNIST1DCNN, MNIST1DMLP
from .registry import (build_backbone, build_classifier, build_student, build_teacher, load_checkpoint_into,
                       model_names, read_state_dict)
from .student import DualHeadStudent, StudentClassifier

__all__ = ["DualHeadStudent", "StudentClassifier", "MNIST1DMLP", "MNIST1DCNN", "build_backbone",
           "build_classifier", "build_student", "build_teacher", "load_checkpoint_into", "model_names",
           "read_state_dict"]
