"""A model too large for the machine fails fast with a clear message (`entrypoint.memory_fit`): `serve` exits
2 before the port opens, naming the sizes and the remedies, instead of being OOM-killed minutes into loading.

The oversized checkpoint is a real safetensors file whose data region is sparse: its header declares 4x this
machine's memory, the file has that length, and it takes no disk space."""

from __future__ import annotations

import json
import math
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from entrypoint.memory_fit import GIB, Budget, check_weights_fit, checkpoint_parameters

ROOT = Path(__file__).resolve().parents[2]
TINY_LLAMA = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64,
              "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
              "vocab_size": 256, "max_position_embeddings": 512, "torch_dtype": "float32"}


def write_sparse_safetensors(path: Path, tensors: dict[str, list[int]]) -> None:
    """A valid safetensors file (format: 8-byte header length, JSON header, data) with F32 tensors of the given
    shapes, the data left as a hole."""
    header, offset = {}, 0
    for name, shape in tensors.items():
        size = 4 * math.prod(shape)
        header[name] = {"dtype": "F32", "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    encoded = json.dumps(header).encode()
    encoded += b" " * (-len(encoded) % 8)
    with open(path, "wb") as file:
        file.write(struct.pack("<Q", len(encoded)) + encoded)
        file.truncate(8 + len(encoded) + offset)


def model_dir(tmp_path: Path, tensors: dict[str, list[int]]) -> Path:
    directory = tmp_path / "model"
    directory.mkdir()
    (directory / "config.json").write_text(json.dumps(TINY_LLAMA))
    write_sparse_safetensors(directory / "model.safetensors", tensors)
    return directory


def report(path: Path, *, dtype="fp32", degree=1, kind="cpu", count=1, quantize=None) -> dict:
    return {"model": {"path": str(path)},
            "plan": {"dtype": dtype, "tensor_parallel_degree": degree, "quantize": quantize,
                     "device": {"kind": kind, "count": count, "name": "test"}}}


def test_parameters_are_counted_from_the_headers(tmp_path):
    directory = model_dir(tmp_path, {"a": [1000, 64], "b": [64]})
    assert checkpoint_parameters(directory) == 64_064


def test_gpu_share_per_rank_and_remedies(tmp_path):
    directory = model_dir(tmp_path, {"w": [1024, 1024 * 1024]})  # 2^30 parameters: 2 GiB in fp16
    two_gpus = Budget([int(1.5 * GIB), int(1.5 * GIB)], "1.5 GiB free on the smallest of 2 GPU(s)")
    check_weights_fit(report(directory, dtype="fp16", degree=2, kind="cuda", count=2), two_gpus)  # 1 GiB each fits
    with pytest.raises(ValueError) as caught:
        check_weights_fit(report(directory, dtype="fp16", degree=1, kind="cuda", count=2), Budget([int(1.5 * GIB)], "1.5 GiB free"))
    message = str(caught.value)
    assert "2.0 GiB of weights (1.07 B parameters in fp16)" in message and "1.5 GiB free" in message
    assert "tensor_parallel_degree (now 1; this machine has 2 GPUs)" in message
    # Quantized plans are not judged by the unquantized size.
    check_weights_fit(report(directory, dtype="fp16", kind="cuda", quantize="dynamic_int8"), Budget([1], "1 byte"))


def test_serve_refuses_a_model_larger_than_this_machine_in_seconds(tmp_path):
    with open("/proc/meminfo") as meminfo:
        total = next(int(line.split()[1]) * 1024 for line in meminfo if line.startswith("MemTotal:"))
    rows = (4 * total) // (4 * 1024 * 1024) + 1  # fp32 rows of 1M parameters: 4x MemTotal in all
    directory = model_dir(tmp_path, {"model.embed_tokens.weight": [rows, 1024 * 1024]})
    env = {key: value for key, value in os.environ.items() if not key.startswith("OPTION_")}
    result = subprocess.run([sys.executable, "-m", "entrypoint", "serve", "--model-dir", str(directory)],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr
    assert "too large for this machine" in result.stderr and "GiB available on this host" in result.stderr
    assert "option.dtype=bf16 or fp16" in result.stderr
    assert "starting the HTTP server" not in result.stderr  # refused before anything started or loaded
