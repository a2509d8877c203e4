"""Sharded loading at tensor_parallel_degree 2 and 3 on CPU: tiny random Phi-3, GPT-NeoX, Falcon, Qwen2
and Mistral checkpoints (saved by transformers, so with their real key names and fused layouts: `qkv_proj`
and `gate_up_proj`, `query_key_value`, `embed_out`, tied embeddings, q/k/v biases, uneven MLP shards) give
the same logits as the unsharded model, and a failed step ends the run on every rank instead of leaving the
ranks out of step. BLOOM and GPT-2 cannot run sharded with DeepSpeed 0.19.8 and transformers 5 (see
handlers/engine_policy.py); that the plan refuses them at degree > 1 is tested in
tests/unit/test_engine_plan.py, and that they really fail sharded is checked here, so the refusal cannot
outlive its cause unnoticed.

One launcher run per degree loads all six models (`tests/support/tp_loading_ranks.py`); the reference is
transformers' own `from_pretrained` forward computed here."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
import torch

from entrypoint.rank_launcher import launcher_command
from tests.support.ports import free_port

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
# hidden 96 = 12 heads of 8; 6 key/value heads: both divide by 2 and 3. intermediate 100 and vocab 1000
# do not divide by 3, so AutoTP's uneven shards are exercised too.
COMMON = dict(vocab_size=1000, hidden_size=96, num_hidden_layers=2, num_attention_heads=12, intermediate_size=100,
              max_position_embeddings=128)
INPUT_IDS = [[5, 17, 300, 42, 999, 7, 8, 123, 64, 500, 2, 77], [901, 3, 3, 44, 250, 600, 12, 11, 10, 9, 8, 1]]
PROMPT = [5, 17, 300, 42, 999, 7]
NEW_TOKENS = 8
# What the plan refuses at degree > 1 (handlers/engine_policy.py TENSOR_PARALLEL_REFUSED) and the symptom
# its reason describes: these must still fail sharded, or the refusal has outlived its cause.
REFUSED = {"bloom": "must match the existing size", "gpt2": "AutoTP not supported for model"}


def _configs() -> dict:
    from transformers import (BloomConfig, FalconConfig, GPT2Config, GPTNeoXConfig, MistralConfig, Phi3Config,
                              Qwen2Config)

    gqa = dict(COMMON, num_key_value_heads=6)
    return {
        "phi3": Phi3Config(**gqa, pad_token_id=0),  # fused qkv_proj (phi3 layout) and gate_up_proj
        "gpt_neox": GPTNeoXConfig(**COMMON),  # fused query_key_value per head; lm_head saved as embed_out
        "falcon": FalconConfig(vocab_size=1000, hidden_size=96, num_hidden_layers=2, num_attention_heads=12,
                               multi_query=False, new_decoder_architecture=False),  # fused query_key_value
        "bloom": BloomConfig(vocab_size=1000, hidden_size=96, n_layer=2, n_head=12),  # ALiBi, fused qkv
        "gpt2": GPT2Config(vocab_size=1000, n_embd=96, n_layer=2, n_head=12, n_positions=128),  # Conv1D c_attn
        "qwen2": Qwen2Config(**gqa, tie_word_embeddings=True),  # q/k/v biases, lm_head tied to the embedding
        "mistral": MistralConfig(**gqa),  # last: also generates through the runners
    }


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict:
    """name -> (checkpoint dir, reference logits); the reference is the unsharded model in transformers."""
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("tp-checkpoints")
    found = {}
    for name, config in _configs().items():
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
        path = root / name
        model.save_pretrained(path)  # safetensors, with transformers' own (reverse-mapped) key names
        reloaded = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        with torch.inference_mode():
            logits = reloaded(input_ids=torch.tensor(INPUT_IDS), use_cache=False).logits
        found[name] = (path, logits, reloaded)
    return found


def _greedy(model) -> list[int]:
    with torch.inference_mode():
        output = model.generate(torch.tensor([PROMPT]), max_new_tokens=NEW_TOKENS, do_sample=False,
                                min_new_tokens=NEW_TOKENS)
    return output[0, len(PROMPT):].tolist()


def _run_ranks(checkpoints: dict, degree: int, workdir: Path, fail: int | None) -> tuple[int, str]:
    spec = {"models": {name: str(path) for name, (path, _, _) in checkpoints.items()},
            "input_ids": INPUT_IDS, "prompt": PROMPT, "new_tokens": NEW_TOKENS}
    (workdir / "spec.json").write_text(json.dumps(spec))
    arguments = ["--spec", str(workdir / "spec.json"), "--out", str(workdir)]
    if fail is not None:
        arguments += ["--fail", str(fail)]
    command = launcher_command("tests.support.tp_loading_ranks", arguments, degree, free_port())
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    log = workdir / "ranks.log"
    with open(log, "w") as out:
        process = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT, cwd=REPO)
        try:
            code = process.wait(timeout=540)  # generous: six models, two or three ranks on a loaded 2-core CI
        except subprocess.TimeoutExpired:
            for child in psutil.Process(process.pid).children(recursive=True):
                child.kill()
            process.kill()
            pytest.fail(f"the ranks did not finish (a hang):\n{log.read_text()[-4000:]}")
    return code, log.read_text()


@pytest.mark.parametrize("degree, fail", [(2, 0), (3, 2)], ids=["degree2-rank0-fails", "degree3-worker-fails"])
def test_sharded_models_match_degree_1_and_a_failed_step_stops_every_rank(checkpoints, tmp_path, degree, fail):
    code, log = _run_ranks(checkpoints, degree, tmp_path, fail)
    errors = json.loads((tmp_path / "errors.json").read_text()) if (tmp_path / "errors.json").exists() else None
    assert errors is not None, log[-4000:]
    for name, symptom in REFUSED.items():
        assert symptom in errors.pop(name, ""), f"{name} no longer fails sharded as the plan says: {errors}"
    assert errors == {}, f"models that failed to load at degree {degree}: {errors}\n{log[-4000:]}"
    for name, (_, reference, _) in checkpoints.items():
        if name in REFUSED:
            continue
        sharded = torch.load(tmp_path / f"{name}.pt")
        assert sharded.shape == reference.shape, name
        difference = (sharded - reference).abs().max().item()
        assert difference < 1e-4, f"{name} at degree {degree}: logits differ by up to {difference}"

    outcome = json.loads((tmp_path / "outcome.json").read_text())
    # Greedy tokens through the runners before the injected failure (the third decode step) match transformers.
    assert outcome["tokens"] == _greedy(checkpoints["mistral"][2])[:len(outcome["tokens"])]
    assert len(outcome["tokens"]) >= 2, outcome
    assert "recoverable" not in outcome, f"rank 0 treated the failed step as recoverable: {outcome}"
    if fail == 0:
        assert "failed on rank 0" in outcome["failed"] and "out of memory" in outcome["failed"], outcome
    else:
        reason = outcome.get("aborted") or outcome.get("failed")
        assert reason is not None and f"rank {fail}" in reason and "died" in reason, outcome
        assert "injected by the test" in reason, f"rank 0's error does not name the worker's cause: {reason}"
    assert code != 0, log[-4000:]
