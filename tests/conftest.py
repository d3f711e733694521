"""Shared test settings: hypothesis profiles, the device under test, dtype tolerances.

Profiles: ``ci`` (default: 50 examples per property, derandomized, no example database), ``dev`` (quick, keeps
failing examples), ``thorough`` (5,000). Pick one with ``HYPOTHESIS_PROFILE=thorough pytest``. 50 examples still
catch every known-bad mutation of the masking ops (``tests/layers/test_masking_mutants.py``). The device comes from
``TORCH_DEVICE`` (CPU by default). Torch runs one thread: the tiny models of the tests are fastest so on a shared
machine, and subprocesses (``fakes.SUBPROCESS_ENV``) do the same arithmetic.
"""

import os

import pytest
import torch
from hypothesis import HealthCheck, settings

CI_EXAMPLES = 50
settings.register_profile(
    "ci",
    max_examples=CI_EXAMPLES,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile("dev", max_examples=30, deadline=None)
settings.register_profile(
    "thorough", max_examples=5000, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

torch.set_num_threads(1)

DEVICE = torch.device(os.environ.get("TORCH_DEVICE", "cpu"))

# absolute/relative tolerance per dtype, for comparisons of computed (not copied) values
TOLERANCES = {
    torch.float32: dict(atol=1e-5, rtol=1e-5),
    torch.float16: dict(atol=1e-3, rtol=1e-3),
    torch.bfloat16: dict(atol=1e-2, rtol=1e-2),
}


@pytest.fixture
def device():
    return DEVICE


def pytest_collection_modifyitems(config, items):
    if DEVICE.type == "cuda" and torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device (set TORCH_DEVICE=cuda on a GPU machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
