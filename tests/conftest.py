"""Fixtures shared by every test directory."""

from __future__ import annotations

import os
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def embedded_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The embedded SmolLM2-135M-Instruct converted to a Hugging Face model directory, once per session.

    Conversion takes about half a minute; set LMI_TEST_MODEL_CACHE to a directory to keep the converted model
    across test runs (it is used as the cache_dir of ensure_embedded_model).
    """
    from entrypoint.embedded_model import ensure_embedded_model

    configured = os.environ.get("LMI_TEST_MODEL_CACHE", "").strip()
    cache_dir = Path(configured) if configured else tmp_path_factory.mktemp("lmi-model-cache")
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
