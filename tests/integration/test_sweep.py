"""The benchmark sweep (benchmarks/sweep.py) against a real server process on the fake engine: one JSON line
per shape and concurrency with the numbers it promises, and PNG plots, also for two runs side by side."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.ports import free_port
from tests.support.server_process import wait_until_healthy

ROOT = Path(__file__).resolve().parents[2]
PNG = b"\x89PNG\r\n\x1a\n"


def word_tokenizer_dir(path: Path) -> Path:
    import tokenizers
    from transformers import PreTrainedTokenizerFast
    vocab = {f"w{i}": i for i in range(200)} | {"[UNK]": 200}
    backend = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    backend.decoder = tokenizers.decoders.WordPiece()
    PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]").save_pretrained(path)
    return path


@pytest.mark.slow
def test_sweep_writes_a_line_per_level_and_plots(tmp_path):
    pytest.importorskip("matplotlib")
    port = free_port()
    log = tmp_path / "server.log"
    server = subprocess.Popen([sys.executable, "-m", "tests.support.fake_server", "--port", str(port),
                               "--step-delay", "0.002"], cwd=ROOT, stdout=open(log, "w"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_healthy(url, server, 120, log.read_text)
        tokenizer = word_tokenizer_dir(tmp_path / "tokenizer")
        out = tmp_path / "a.jsonl"
        command = [sys.executable, "benchmarks/sweep.py", "run", "--url", url, "--model", "fake-model",
                   "--tokenizer", str(tokenizer), "--concurrency", "1", "3", "--shapes", "16/8", "32/4",
                   "--requests-per-client", "2", "--label", "a", "--out", str(out), "--plots", str(tmp_path / "plots"),
                   "--fail-on-error"]
        done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stdout + done.stderr
    finally:
        server.terminate()
        server.wait(timeout=60)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["prompt_tokens"], r["max_tokens"], r["concurrency"]) for r in rows] == \
        [(16, 8, 1), (16, 8, 3), (32, 4, 1), (32, 4, 3)]
    for row in rows:
        assert row["requests"] == 2 * row["concurrency"] and row["errors"] == 0
        assert row["output_tokens"] == row["requests"] * row["max_tokens"]
        assert row["output_tok_s"] > 0 and row["ttft_p50_ms"] <= row["ttft_p99_ms"]
        assert row["itl_p50_ms"] <= row["itl_p99_ms"] and row["label"] == "a"
    for name in ("throughput_vs_latency.png", "latency_vs_concurrency.png"):
        assert (tmp_path / "plots" / name).read_bytes()[:8] == PNG
    # peers side by side: a second label in another file, plotted together
    other = tmp_path / "b.jsonl"
    other.write_text("\n".join(json.dumps({**row, "label": "b", "output_tok_s": row["output_tok_s"] / 2})
                               for row in rows) + "\n")
    done = subprocess.run([sys.executable, "benchmarks/sweep.py", "plot", str(out), str(other), "--out",
                           str(tmp_path / "both")], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "both" / "throughput_vs_latency.png").read_bytes()[:8] == PNG
