"""The AutoTP engine and rolling batch on a CUDA GPU (skipped without one): greedy output equals
transformers' generate, batched requests equal the same requests alone, and tensor_parallel_degree=2
(two GPUs, NCCL) serves the same greedy text as degree 1."""

from __future__ import annotations

import os
import random
import subprocess
import sys

import httpx
import pytest

from tests.support.ports import free_port
from tests.support.server_process import wait_until_healthy

torch = pytest.importorskip("torch")
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def tiny_llama(seed: int = 0, dtype=None):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                         num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=1024,
                         rms_norm_eps=1e-5, initializer_range=0.2)  # peaked logits: no near-ties in greedy
    return LlamaForCausalLM(config).to("cuda", dtype or torch.float16).eval()


class NumberTokenizer:
    eos_token_id = None
    all_special_ids: list[int] = []

    def __len__(self):
        return 512

    def decode(self, ids, skip_special_tokens=True):
        return " ".join(str(i) for i in ids)


def engine_for(model, max_batch=8, kv_tokens=16384, prefill=256):
    from tests.support.engines import make_engine
    return make_engine(model, NumberTokenizer(), max_batch=max_batch, prefill=prefill, max_total=1024,
                       kv_tokens=kv_tokens, device="cuda")


def run(engine, requests):
    from handlers.engine import GenerationRequest, SamplingParams
    for rid, (prompt, n) in enumerate(requests):
        engine.add_request(GenerationRequest(str(rid), "", prompt, SamplingParams(max_new_tokens=n)))
    tokens = {str(i): [] for i in range(len(requests))}
    while engine.has_unfinished():
        for out in engine.step():
            tokens[out.request_id] += [t.id for t in out.tokens]
    return [tokens[str(i)] for i in range(len(requests))]


def requests(count=8, seed=3):
    rng = random.Random(seed)
    return [([rng.randrange(512) for _ in range(rng.randrange(4, 60))], rng.randrange(4, 40)) for _ in range(count)]


def test_greedy_matches_transformers_generate_on_gpu():
    model = tiny_llama(dtype=torch.float32)
    for prompt, n in requests(4):
        expected = model.generate(torch.tensor([prompt], device="cuda"), max_new_tokens=n, do_sample=False,
                                  pad_token_id=0)[0, len(prompt):].tolist()
        assert run(engine_for(model), [(prompt, n)])[0] == expected


def test_batched_equals_alone_on_gpu_fp16():
    model = tiny_llama()
    batch = requests(8)
    together = run(engine_for(model), batch)
    alone = [run(engine_for(model, max_batch=1), [item])[0] for item in batch]
    assert together == alone



def serve_and_generate(model_dir, degree, prompts, tmp_path):
    port = free_port()
    env = {**os.environ, "SAGEMAKER_BIND_TO_PORT": str(port), "OPTION_MODEL_ID": str(model_dir),
           "OPTION_TENSOR_PARALLEL_DEGREE": str(degree), "OPTION_DTYPE": "fp32", "NCCL_NVLS_ENABLE": "0"}
    log = open(tmp_path / f"tp{degree}.log", "w")
    process = subprocess.Popen([sys.executable, "-m", "entrypoint", "serve", "--model-dir", str(tmp_path)],
                               env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_healthy(url, process, 600, lambda: (tmp_path / f"tp{degree}.log").read_text()[-3000:], interval=1)
        return [httpx.post(f"{url}/invocations", timeout=120,
                           json={"inputs": p, "parameters": {"max_new_tokens": 16}}).json()["generated_text"]
                for p in prompts]
    finally:
        process.terminate()
        process.wait(timeout=120)


def word_tokenizer():
    """A 512-word tokenizer built in the test (token i is the word "w<i>"), so no model files are needed."""
    import tokenizers
    from transformers import PreTrainedTokenizerFast
    vocab = {f"w{i}": i for i in range(511)} | {"[UNK]": 511}
    backend = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]")


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_tensor_parallel_2_serves_the_same_text_as_1(tmp_path):
    model = tiny_llama(dtype=torch.float32)
    model_dir = tmp_path / "model"
    model.save_pretrained(model_dir)
    word_tokenizer().save_pretrained(model_dir)
    prompts = ["w1 w2 w3 w4", "w100 w7 w300", "w5 " * 20]
    one = serve_and_generate(model_dir, 1, prompts, tmp_path)
    two = serve_and_generate(model_dir, 2, prompts, tmp_path)
    assert one == two
