"""Fixtures shared by every test directory."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# Without CUDA, Triton's interpreter runs the GPU kernels of quantization/int8_triton.py on the CPU
# (tests/unit/test_int8_triton.py). Triton reads TRITON_INTERPRET when it is first used, and DeepSpeed's
# import already uses it, so the choice is made here, before any test module is collected.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session")
def embedded_model_dir() -> Path:
    """The embedded SmolLM2-135M-Instruct as a Hugging Face model directory, fetched and converted once per
    machine (~30 s the first time), not once per session.

    It lives where the server keeps it, `<cache>/embedded/SmolLM2-135M-Instruct`, in the machine-wide cache
    the server uses by default (`$LMI_CACHE_DIR`, else `$XDG_CACHE_HOME/lmi-deepspeed`, else
    `~/.cache/lmi-deepspeed`); LMI_TEST_MODEL_CACHE names another cache directory for the tests. Test
    sessions started together share one conversion (a file lock; see `ensure_embedded_model`).
    """
    from entrypoint.embedded_model import ensure_embedded_model
    from entrypoint.model_resolution import default_cache_dir

    configured = os.environ.get("LMI_TEST_MODEL_CACHE", "").strip()
    cache_dir = Path(configured).expanduser() if configured else default_cache_dir()
    return ensure_embedded_model(cache_dir, progress=False)


@pytest.fixture
def single_thread():
    """Run torch on one thread for the test. Tiny random models do microseconds of work per op, and on a busy
    2-core machine OpenMP's thread hand-offs dominate: measured 25x faster (0.07 s vs 1.6-2.8 s for a 2-layer
    Llama forward of 4 x 256 tokens at load average 13)."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
