"""dhkd: the Dual-Head Knowledge Distillation method (models, distillers, trainer, CLI) on dhkd_kernels."""
__version__ = "0.1.0"
