"""The real server (`python -m entrypoint serve`) on the embedded SmolLM2-135M-Instruct with each `quantize`
value: the linear layers are int8, the model still answers correctly, and smoothquant calibrates on the
configured text, logs the alpha its search chose and saves the calibration under model_cache_dir."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from quantization.corpus import pydoc_topics
from tests.support.ports import free_port
from tests.support.server_process import wait_until_healthy

pytestmark = pytest.mark.slow

CHAT = "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"


@pytest.mark.parametrize("method, degree", [("dynamic_int8", 1), ("smoothquant", 1), ("smoothquant", 3)])
def test_serves_with_int8_linear_layers(method, degree, embedded_model_dir: Path, tmp_path: Path):
    """Degree 3 (the embedded model has 9 heads, 3 KV heads): every rank calibrates in lockstep, smooths with
    factors agreed across ranks and quantizes its own shards (row-parallel ones reduce after dequantizing)."""
    port = free_port()
    cache = tmp_path / "cache"
    env = {**os.environ, "SAGEMAKER_BIND_TO_PORT": str(port), "OPTION_MODEL_ID": str(embedded_model_dir),
           "OPTION_QUANTIZE": method, "OPTION_MODEL_CACHE_DIR": str(cache), "OPTION_MAX_TOKENS": "512",
           "OPTION_TENSOR_PARALLEL_DEGREE": str(degree)}
    if method == "smoothquant":
        # a short calibration text keeps the test's calibration to a few windows on a 2-core machine
        calibration = tmp_path / "calibration.txt"
        calibration.write_text("\n\n".join(pydoc_topics("calibration")[:2]), encoding="utf-8")
        env["OPTION_SMOOTHQUANT_CALIBRATION_DATA"] = str(calibration)
    log_path = tmp_path / "server.log"
    with open(log_path, "w") as log:
        process = subprocess.Popen([sys.executable, "-m", "entrypoint", "serve", "--model-dir", str(tmp_path)],
                                   env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            url = f"http://127.0.0.1:{port}"
            wait_until_healthy(url, process, 1800, lambda: log_path.read_text()[-4000:])
            response = httpx.post(f"{url}/invocations", timeout=600,
                                  json={"inputs": CHAT, "parameters": {"max_new_tokens": 16}})
            assert response.status_code == 200, response.text
            assert "Paris" in response.json()["generated_text"], (response.json(), log_path.read_text()[-3000:])
        finally:
            process.terminate()
            code = process.wait(timeout=300)
    output = log_path.read_text()
    # DeepSpeed's launcher (degree > 1) exits 1 on SIGTERM after taking its ranks down (test_tensor_parallel.py)
    assert code == 0 or (degree > 1 and output.count("rank 0 said stop") == degree - 1), output[-4000:]
    assert f"quantize={method}: 210 linear layers now int8 (W8A8)" in output, output[-4000:]
    if degree > 1:  # every rank reports its own shards
        assert output.count("linear layers now int8") >= degree, output[-4000:]
    if method == "smoothquant":
        assert "chosen by search" in output and str(calibration) in output
        assert len(list((cache / "smoothquant").glob("*.pt"))) == 1
