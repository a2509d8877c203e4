"""Kernel injection on a CPU: the injected blocks run on DeepSpeed 0.19.8's own PyTorch fallbacks for its CUDA
ops (every op binding falls back when the compiled op module lacks the function), so the CPU tests exercise the
project's driver, runner and batching over DeepSpeed's real injected modules. The GPU tests run the same checks
on the compiled kernels.

Two fallbacks are wrong in 0.19.8 and are mended here (test support only; the CUDA kernels are right):
- `MLPGemmOp.mlp_gemm_fallback` applies GELU whatever the activation (OPT's is ReLU).
- the rotate-half rotary fallback calls transformers' `LlamaRotaryEmbedding(dim, base=...)` and
  `apply_rotary_pos_emb(..., position_ids)` with their pre-5 signatures: GPT-NeoX and Llama cannot run on it,
  and the rotate-every-two fallback (GPT-J) leaves the rotation out (its logits stop depending on position):
  the CPU tests cover the families without rotary (GPT-2, GPT-Neo, OPT, BLOOM).
- the softmax fallback ignores GPT-Neo's local window: the CPU tests give its local layers a window longer than
  their sequences (the GPU tests a shorter one).
"""

from __future__ import annotations

#: families whose injected blocks DeepSpeed's fallbacks run correctly on transformers 5
CPU_FAMILIES = ("gpt2", "opt", "bloom")  # GPT-Neo matched here too, but is refused: wrong on the CUDA kernels


def use_reference_ops() -> None:
    import torch
    import torch.nn.functional as F
    from deepspeed.ops.transformer.inference.op_binding.base import BaseOp
    from deepspeed.ops.transformer.inference.op_binding.mlp_gemm import MLPGemmOp
    from deepspeed.utils.types import ActivationFuncType

    class NoCompiledOps:  # every attribute lookup fails, so every binding takes its fallback
        pass

    BaseOp.inference_module = NoCompiledOps()
    if getattr(MLPGemmOp, "_activation_mended", False):
        return

    def mlp_gemm_fallback(self, input, residual, input_bias, weight_interm, weight_out, bias, gamma, beta, eps,
                          pre_layer_norm, mlp_after_attn, interm_scale, out_scale, dtype, mlp_act_func_type,
                          transpose):
        if not mlp_after_attn:
            raise NotImplementedError
        residual_add = F.layer_norm(input + residual + input_bias, (input.shape[2],), gamma, beta, eps)
        tmp = torch.matmul(residual_add, weight_interm.t() if transpose else weight_interm) + bias
        tmp = F.relu(tmp) if mlp_act_func_type == ActivationFuncType.ReLU else F.gelu(tmp)
        return torch.matmul(tmp, weight_out.t() if transpose else weight_out), residual_add

    MLPGemmOp.mlp_gemm_fallback = mlp_gemm_fallback
    MLPGemmOp._activation_mended = True


def tiny_config(model_type: str, hidden: int = 64, layers: int = 2, heads: int = 4, vocab: int = 500,
                window: int = 256) -> object:
    """A random-weight config of `model_type` that kernel injection serves (MHA; GPT-Neo with a local layer of
    `window` positions)."""
    from transformers import AutoConfig

    common = {"vocab_size": vocab}
    shapes = {
        "gpt2": dict(n_embd=hidden, n_layer=layers, n_head=heads, n_positions=1024),
        "gptj": dict(n_embd=hidden, n_layer=layers, n_head=heads, n_positions=1024, rotary_dim=hidden // heads // 2),
        "gpt_neo": dict(hidden_size=hidden, num_layers=layers, num_heads=heads, max_position_embeddings=1024,
                        attention_types=[[["global", "local"], layers // 2]], window_size=window),
        "gpt_neox": dict(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                         intermediate_size=4 * hidden, max_position_embeddings=1024, rotary_pct=0.25),
        "opt": dict(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads, ffn_dim=4 * hidden,
                    max_position_embeddings=1024, word_embed_proj_dim=hidden),
        "bloom": dict(hidden_size=hidden, n_layer=layers, n_head=heads),
        "llama": dict(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                      num_key_value_heads=heads, intermediate_size=2 * hidden, max_position_embeddings=1024,
                      rms_norm_eps=1e-5),
    }
    config = AutoConfig.for_model(model_type, **common, **shapes[model_type])
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if getattr(config, key, None) is not None and getattr(config, key) >= vocab:
            setattr(config, key, vocab - 1)
    return config


def random_model(config: object, std: float = 0.1, seed: int = 0) -> object:
    """HF's model with weights N(0, std): large enough that attention depends on position (a probe with
    near-uniform attention cannot tell positions apart)."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "norm" in name or name.endswith("ln_f.weight") or ".ln_" in name:
                continue  # keep norms at HF's init (weight 1, bias 0)
            parameter.normal_(0.0, std)
    return model


def teacher_forced(driver: object, prompts: list[list[int]], continuations: list[list[int]]) -> list[list[object]]:
    """Drive the injected model as the runner does: all prompts left-padded in one pass, then one token per row
    per pass (the continuations, teacher-forced). Returns, per row, the logits after its prompt and after each
    continuation token but the last."""
    import torch

    device = driver.device
    rows, longest = len(prompts), max(2, max(len(p) for p in prompts))
    ids = torch.zeros(rows, longest, dtype=torch.long)
    mask = torch.zeros(rows, longest, dtype=torch.long)
    positions = torch.zeros(rows, longest, dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, longest - len(prompt):] = torch.tensor(prompt)
        mask[row, longest - len(prompt):] = 1
        positions[row, longest - len(prompt):] = torch.arange(len(prompt))
    ids, mask, positions = ids.to(device), mask.to(device), positions.to(device)
    out = [[logits] for logits in driver.forward(ids, mask, positions).float().unbind(0)]
    steps = max(len(c) for c in continuations) - 1
    for step in range(steps):
        mask = torch.cat([mask, torch.ones(rows, 1, dtype=torch.long, device=device)], dim=1)
        token = torch.tensor([[c[min(step, len(c) - 1)]] for c in continuations], device=device)
        position = torch.tensor([[len(p) + step] for p in prompts], device=device)
        for row, logits in enumerate(driver.forward(token, mask, position).float().unbind(0)):
            if step < len(continuations[row]) - 1:
                out[row].append(logits)
    return out


def reference_logits(model: object, prompt: list[int], continuation: list[int]) -> object:
    """HF's own next-token logits for each position from the prompt's last on, one row alone, unpadded."""
    import torch

    device = next(model.parameters()).device
    ids = torch.tensor([prompt + continuation[:-1]], device=device)
    with torch.no_grad():
        return model(ids).logits[0, len(prompt) - 1:].float()
