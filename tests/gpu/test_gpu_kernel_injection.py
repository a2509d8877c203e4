"""Kernel injection on a CUDA GPU, DeepSpeed's compiled kernels: the project's driver of the injected blocks
against HF fp32 on tiny random configs of every family it serves (init 0.1, so attention depends on position;
non-repeating token ids; left-padded batches, as the runner sends them), and the engine through HTTP.

On a machine with CUDA nothing here skips for a missing part of the GPU install: it fails."""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import re

import pytest

from tests.support.kernel_injection_reference import random_model, reference_logits, teacher_forced, tiny_config

torch = pytest.importorskip("torch")
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

FAMILIES = ("gpt2", "gptj", "gpt_neo", "gpt_neox", "opt", "bloom", "llama")
#: kernel injection's mean |logit - HF fp32| may be at most this multiple of HF fp16's own
TOLERANCE = 2.0


@pytest.fixture(autouse=True)
def gpu_install():
    assert importlib.util.find_spec("deepspeed") is not None, "deepspeed is not installed: pip install -e '.[gpu]'"
    yield
    import gc
    gc.collect()
    torch.cuda.empty_cache()


def _record(name: str, values: dict) -> None:
    """Append the measured figures to $KI_RESULTS (a JSON-lines file) when set: RESULTS.md quotes them."""
    path = os.environ.get("KI_RESULTS")
    if path:
        with open(path, "a") as out:
            out.write(json.dumps({"test": name, **values}) + "\n")


def _deviation(rows_logits: list[list], references: list) -> tuple[float, float]:
    """Mean |Δlogit| over every row and position, and the share of positions whose argmax agrees."""
    total, count, agree = 0.0, 0, 0
    for logits, reference in zip(rows_logits, references):
        got = torch.stack(logits)
        total += (got - reference).abs().mean().item() * got.shape[0]
        count += got.shape[0]
        agree += (got.argmax(-1) == reference.argmax(-1)).sum().item()
    return total / count, agree / count


@pytest.mark.parametrize("model_type", FAMILIES)
def test_injected_blocks_match_hf_fp32_in_a_left_padded_batch(model_type):
    from handlers.kernel_injection_model import inject

    config = tiny_config(model_type, hidden=256, layers=4, heads=8, vocab=1000)
    reference = random_model(config).cuda()
    half = copy.deepcopy(reference).half()
    model = copy.deepcopy(half)
    driver = inject(model, torch.float16, max_tokens=512)
    generator = torch.Generator().manual_seed(1)
    lengths, steps = [300, 17, 2], 12
    prompts = [torch.randperm(1000, generator=generator)[:n].tolist() for n in lengths]
    continuations = [torch.randperm(1000, generator=generator)[:steps].tolist() for _ in lengths]
    got = teacher_forced(driver, prompts, continuations)
    fp32 = [reference_logits(reference, p, c) for p, c in zip(prompts, continuations)]
    hf16 = [list(reference_logits(half, p, c).unbind(0)) for p, c in zip(prompts, continuations)]
    injected, agree = _deviation(got, fp32)
    own, own_agree = _deviation(hf16, fp32)
    _record("logits", {"model_type": model_type, "ki_mean_abs": injected, "hf16_mean_abs": own,
                       "ratio": injected / own, "ki_argmax_agree": agree, "hf16_argmax_agree": own_agree})
    assert injected <= TOLERANCE * own, (model_type, injected, own)
    # a second, smaller batch reuses the workspace: the first batch's K/V must not leak into it
    second = teacher_forced(driver, prompts[1:], continuations[1:])
    again, _ = _deviation(second, fp32[1:])
    assert again <= TOLERANCE * own, (model_type, again, own)


# ---- the engine through HTTP --------------------------------------------------------------------------------
SERVED = ("gptj", "opt", "bloom", "gpt_neox")


@pytest.mark.parametrize("model_type", SERVED)
def test_http_batch_with_its_own_limits_and_stops_gives_hf_greedy_text(tmp_path, model_type):
    """`python -m entrypoint serve` with kernel_injection=true: the plan's engine is kernel injection, its gate
    passes, and four requests sent at once (one dynamic batch: different prompt lengths, max_new_tokens and a
    stop sequence) each answer HF generate's greedy text (fp32, the same weights)."""
    import threading

    import httpx

    from tests.support.server_process import serve_process
    from tests.support.word_tokenizer import sized_word_tokenizer

    vocab = 1000
    model = random_model(tiny_config(model_type, hidden=256, layers=4, heads=8, vocab=vocab))
    with torch.no_grad():  # a peaked head: greedy choices far from ties, so fp16 and fp32 agree on them
        model.get_output_embeddings().weight.mul_(8.0)
    path = tmp_path / "model"
    model.save_pretrained(path)
    sized_word_tokenizer(vocab).save_pretrained(path)
    model = model.cuda()
    generator = torch.Generator().manual_seed(3)
    prompts = [torch.randperm(vocab - 2, generator=generator)[:n].tolist() for n in (60, 1, 9, 23)]
    limits = [16, 12, 3, 16]
    expected, decided = [], []  # HF's greedy words, and how many of them no near-tie could flip
    for prompt, limit in zip(prompts, limits):
        out = model.generate(torch.tensor([prompt], device="cuda"), max_new_tokens=limit, do_sample=False,
                             attention_mask=torch.ones(1, len(prompt), dtype=torch.long, device="cuda"),
                             pad_token_id=vocab - 1, eos_token_id=None, output_scores=True,
                             return_dict_in_generate=True)
        expected.append([f"w{i}" for i in out.sequences[0, len(prompt):].tolist()])
        # fp16 kernels may pick the other token where HF fp32's top two are within 0.1: compare up to there
        margins = [float(top[0] - top[1]) for top in (score[0].float().topk(2).values for score in out.scores)]
        decided.append(next((i for i, m in enumerate(margins) if m < 0.1), limit))
    stop = " ".join(expected[3][5:7])  # request 3 stops at the first occurrence of these two words
    cut = " ".join(expected[3]).find(stop)
    log_path = tmp_path / "server.log"
    with serve_process(path, log_path, OPTION_DTYPE="fp16", OPTION_KERNEL_INJECTION="true", OPTION_BATCH_SIZE="4",
                       OPTION_MAX_BATCH_DELAY="2000", OPTION_MAX_TOKENS="1024") as url:
        answers: dict[int, httpx.Response] = {}

        def send(i: int) -> None:
            parameters = {"max_new_tokens": limits[i], "do_sample": False, "ignore_eos": True}
            if i == 3:
                parameters["stop"] = [stop]
            answers[i] = httpx.post(f"{url}/invocations", timeout=300,
                                    json={"inputs": " ".join(f"w{t}" for t in prompts[i]), "parameters": parameters})

        threads = [threading.Thread(target=send, args=(i,)) for i in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        texts = {i: answer.json()["generated_text"].strip() for i, answer in answers.items()
                 if answer.status_code == 200}
        assert len(texts) == 4, {i: a.text for i, a in answers.items()}
        log = log_path.read_text()
        served = re.findall(r"^\s+engine\s+(\S+)\s*$", log, re.M)  # the start-up summary's row
        assert "plan: engine kernel_injection" in log and served == ["kernel_injection"], log[-3000:]
        assert "correctness gate passed" in log, log[-3000:]
        _record("gate", {"model_type": model_type,
                         "line": next(line for line in log.splitlines() if "correctness gate passed" in line)[-700:]})
        for i in range(3):
            got = texts[i].split()
            assert len(got) == limits[i] and got[:decided[i]] == expected[i][:decided[i]], \
                (model_type, i, texts[i], expected[i], decided[i], log[-2000:])
        assert sum(decided[:3]) >= 10, decided  # the comparison above covered most of the words
        _record("http_greedy", {"model_type": model_type, "decided": decided, "limits": limits})
        if decided[3] >= 7:
            assert texts[3] == " ".join(expected[3])[:cut].strip(), (model_type, texts[3], expected[3], stop)
        # what clients send besides: OpenAI chat with its default sampling, and a request this engine refuses
        chat = httpx.post(f"{url}/v1/chat/completions", timeout=300,
                          json={"model": str(path), "messages": [{"role": "user", "content": "w1 w2 w3"}],
                                "max_tokens": 8})
        assert chat.status_code == 200 and chat.json()["usage"]["completion_tokens"] > 0, chat.text
        refused = httpx.post(f"{url}/invocations", timeout=60, json={"inputs": "w1 w2", "parameters": {
            "max_new_tokens": 2, "details": True, "decoder_input_details": True}})
        assert refused.status_code == 400 and "prompt log-probabilities" in refused.text, refused.text
