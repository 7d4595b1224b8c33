"""Experiments built on the trainer (e.g. MNIST-1D), and their plotting and table helpers (:mod:`.plots`)."""
