"""Shared test set-up. Without CUDA, Triton kernels run in the interpreter (TRITON_INTERPRET=1),
which must be set before triton compiles anything, hence here, before any test module imports."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


@pytest.fixture(params=["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
def device(request):
    return torch.device(request.param)

try:
    from hypothesis import settings as _hyp_settings

    # CI explores the same examples every run (a red CI must be reproducible); locally it explores anew.
    _hyp_settings.register_profile("ci", derandomize=True, print_blob=True)
    if os.environ.get("CI"):
        _hyp_settings.load_profile("ci")
except ImportError:
    pass
