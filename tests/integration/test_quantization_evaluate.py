"""`python -m entrypoint quality` prints one JSON object (and nothing else) on stdout with a perplexity per
variant and the weight-bytes target; a short run on the embedded model (smoothquant is served end to end in
test_quantized_serving.py, and its quality is in RESULTS.md)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


def test_prints_one_json_object(embedded_model_dir: Path):
    result = subprocess.run([sys.executable, "-m", "entrypoint", "quality", "--model-dir", str(embedded_model_dir),
                             "--windows", "1", "--window-tokens", "64", "--variants", "fp32,naive_w8a8,dynamic_int8"],
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout)
    assert set(report["variants"]) == {"fp32", "naive_w8a8", "dynamic_int8"}
    assert all(math.isfinite(v["perplexity"]) and v["perplexity"] > 1 for v in report["variants"].values())
    assert report["variants"]["dynamic_int8"]["linear_layers"] == 210
    assert report["targets"]["weights_at_most_55_percent"] is True
    assert {"date", "torch", "transformers", "deepspeed", "machine", "command"} <= set(report)
    assert report["device"] == "cpu"


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the refusal on a machine without a GPU")
def test_device_cuda_without_a_gpu_is_refused_before_anything_loads():
    result = subprocess.run([sys.executable, "-m", "entrypoint", "quality", "--device", "cuda"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and result.stdout == ""
    assert "--device cuda: no CUDA GPU is visible to this process" in result.stderr
