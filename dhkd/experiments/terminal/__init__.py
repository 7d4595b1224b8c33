"""``dhkd experiment terminal`` (issue 20): the DHKD paper's claim in the terminal phase of training, and
whether the official numerics' collapse depends on the torch version.

    run_experiment("runs/terminal", jobs=2)         # configs/terminal/experiment.yaml
    run_experiment("runs/tq", quick=True)           # the quick plan (minutes)

Modules: ``plan`` (the YAML plan, arms -> validated configs), ``data`` (digits, MNIST-1D-100, models),
``loop`` (one run: training with the official loop's nan rule for official numerics, per-epoch
measurements, head re-fit), ``metrics`` (NC1-NC4, gradient conflict, logit maxima), ``ufm`` (the
unconstrained-features model), ``stats`` (paired differences, 95% CI), ``report`` (tables, gates,
decision rules, plots), ``driver`` (teacher, lr tuning with edge widening, seeds, the folder lock).
"""
from .driver import run_experiment

__all__ = ["run_experiment"]
