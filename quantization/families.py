"""Where SmoothQuant folds its factors, per architecture family: each decoder layer's norm -> linear pairs.

SmoothQuant (Xiao et al., 2022, arXiv:2211.10438, section 4) divides each input channel j of a linear
layer's activation by s_j and multiplies the weight's column j by s_j: the product is unchanged, the
activation outliers shrink. The division costs nothing when it is folded into whatever produced the
activation: a LayerNorm's weight and bias, or an RMSNorm's weight. So a linear layer can be smoothed only
when a norm feeds it directly; every linear layer fed by the same norm shares one s (its columns all
scale together). The others (attention output, MLP down projection) are quantized unsmoothed.

| family (model_type) | norm (per decoder layer) -> linears it feeds | quantized unsmoothed |
|---|---|---|
| Llama-like (llama, mistral, qwen2): RMSNorm weight | input_layernorm -> self_attn.q_proj, k_proj, v_proj; post_attention_layernorm -> mlp.gate_proj, up_proj; and mlp.up_proj's output rows -> mlp.down_proj (SwiGLU: down_proj's input is silu(gate) * up, so scaling up's output channel j scales input j; the largest activation outliers of Llama models sit there). Not under tensor parallelism, where down_proj's input is sharded across ranks: there down_proj is quantized unsmoothed | self_attn.o_proj |
| OPT (opt): LayerNorm weight+bias | self_attn_layer_norm -> self_attn.q_proj, k_proj, v_proj; final_layer_norm -> fc1 | self_attn.out_proj, fc2 |
| GPT-2 (gpt2): LayerNorm | ln_1 -> attn.c_attn (fused QKV, Conv1D); ln_2 -> mlp.c_fc (Conv1D) | attn.c_proj, mlp.c_proj |
| GPT-J (gptj): LayerNorm | ln_1 -> attn.q_proj, k_proj, v_proj AND mlp.fc_in (parallel attention/MLP share one norm, so one s for all four) | attn.out_proj, mlp.fc_out |
| GPT-Neo (gpt_neo): LayerNorm | ln_1 -> attn.attention.q_proj, k_proj, v_proj; ln_2 -> mlp.c_fc | attn.attention.out_proj, mlp.c_proj |
| GPT-NeoX (gpt_neox): LayerNorm | input_layernorm -> attention.query_key_value; post_attention_layernorm -> mlp.dense_h_to_4h (also with use_parallel_residual: each branch has its own norm) | attention.dense, mlp.dense_4h_to_h |
| BLOOM (bloom): LayerNorm | input_layernorm -> self_attention.query_key_value; post_attention_layernorm -> mlp.dense_h_to_4h | self_attention.dense, mlp.dense_4h_to_h |
| Falcon (falcon): LayerNorm | new_decoder_architecture with 2 norms (40B/180B): ln_attn -> self_attention.query_key_value, ln_mlp -> mlp.dense_h_to_4h; parallel_attn with 1 norm (7B): input_layernorm -> query_key_value AND dense_h_to_4h (shared s); sequential (parallel_attn=false): input_layernorm -> query_key_value, post_attention_layernorm -> dense_h_to_4h | self_attention.dense, mlp.dense_4h_to_h |

Not supported (plan error): families whose norm cannot carry the factor, e.g. Gemma's RMSNorm multiplies by
(1 + weight), OPT with do_layer_norm_before=false (OPT-350m: the norms come after the linear layers), BLOOM
with apply_residual_connection_post_layernorm=true (the residual would carry the smoothed activation).
Linear layers are matched by name within one decoder layer (transformers 5's module names).

This module imports no torch: the planner's tests check the engine policy's smoothquant verdicts against
`FAMILIES` without loading anything.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping


@dataclass(frozen=True)
class SmoothGroup:
    """One norm and the linear layers it feeds, as module paths relative to a decoder layer.

    `source_is_linear`: the factor goes into a linear layer's output rows instead of a norm (the up
    projection of a gated MLP, whose output multiplies the gate's elementwise and so scales channel by
    channel into the down projection's input)."""

    norm: str
    linears: tuple[str, ...]
    source_is_linear: bool = False


@dataclass(frozen=True)
class Family:
    name: str
    model_types: tuple[str, ...]
    layers: str  # path of the decoder layers' ModuleList from the *ForCausalLM module
    groups: Callable[[Mapping[str, Any]], tuple[SmoothGroup, ...]]  # from the model's config dict
    unsmoothed: tuple[str, ...]  # linear layers quantized without smoothing (documentation and tests)
    refuse: Callable[[Mapping[str, Any]], str | None] = lambda config: None  # why a config cannot be smoothed


def _fixed(*groups: SmoothGroup) -> Callable[[Mapping[str, Any]], tuple[SmoothGroup, ...]]:
    return lambda config: groups


def _falcon_groups(config: Mapping[str, Any]) -> tuple[SmoothGroup, ...]:
    # transformers' FalconDecoderLayer: num_ln_in_parallel_attn defaults to 2 with the new architecture.
    qkv, mlp = "self_attention.query_key_value", "mlp.dense_h_to_4h"
    parallel = config.get("parallel_attn", True)
    new = config.get("new_decoder_architecture", False)
    norms = config.get("num_ln_in_parallel_attn") or (2 if new else 1)
    if parallel and new and norms == 2:
        return (SmoothGroup("ln_attn", (qkv,)), SmoothGroup("ln_mlp", (mlp,)))
    if not parallel:
        return (SmoothGroup("input_layernorm", (qkv,)), SmoothGroup("post_attention_layernorm", (mlp,)))
    return (SmoothGroup("input_layernorm", (qkv, mlp)),)


def _opt_refuse(config: Mapping[str, Any]) -> str | None:
    if not config.get("do_layer_norm_before", True):
        return ("OPT with do_layer_norm_before=false (OPT-350m) applies its norms after the linear layers, so "
                "there is no norm to fold the smoothing factors into")
    return None


def _bloom_refuse(config: Mapping[str, Any]) -> str | None:
    if config.get("apply_residual_connection_post_layernorm", False):
        return ("BLOOM with apply_residual_connection_post_layernorm=true adds the norm's output to the residual, "
                "so folding the factors into the norm would change the model")
    return None


def _falcon_refuse(config: Mapping[str, Any]) -> str | None:
    if config.get("new_decoder_architecture", False) and not config.get("parallel_attn", True):
        return "Falcon with new_decoder_architecture and parallel_attn=false is not a layout transformers runs"
    return None


_LLAMA = Family(
    "Llama-like", ("llama", "mistral", "qwen2"), "model.layers",
    _fixed(SmoothGroup("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
           SmoothGroup("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj")),
           SmoothGroup("mlp.up_proj", ("mlp.down_proj",), source_is_linear=True)),
    ("self_attn.o_proj",))

FAMILIES: tuple[Family, ...] = (
    _LLAMA,
    Family("OPT", ("opt",), "model.decoder.layers",
           _fixed(SmoothGroup("self_attn_layer_norm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
                  SmoothGroup("final_layer_norm", ("fc1",))),
           ("self_attn.out_proj", "fc2"), _opt_refuse),
    Family("GPT-2", ("gpt2",), "transformer.h",
           _fixed(SmoothGroup("ln_1", ("attn.c_attn",)), SmoothGroup("ln_2", ("mlp.c_fc",))),
           ("attn.c_proj", "mlp.c_proj")),
    Family("GPT-J", ("gptj",), "transformer.h",
           _fixed(SmoothGroup("ln_1", ("attn.q_proj", "attn.k_proj", "attn.v_proj", "mlp.fc_in"))),
           ("attn.out_proj", "mlp.fc_out")),
    Family("GPT-Neo", ("gpt_neo",), "transformer.h",
           _fixed(SmoothGroup("ln_1", ("attn.attention.q_proj", "attn.attention.k_proj", "attn.attention.v_proj")),
                  SmoothGroup("ln_2", ("mlp.c_fc",))),
           ("attn.attention.out_proj", "mlp.c_proj")),
    Family("GPT-NeoX", ("gpt_neox",), "gpt_neox.layers",
           _fixed(SmoothGroup("input_layernorm", ("attention.query_key_value",)),
                  SmoothGroup("post_attention_layernorm", ("mlp.dense_h_to_4h",))),
           ("attention.dense", "mlp.dense_4h_to_h")),
    Family("BLOOM", ("bloom",), "transformer.h",
           _fixed(SmoothGroup("input_layernorm", ("self_attention.query_key_value",)),
                  SmoothGroup("post_attention_layernorm", ("mlp.dense_h_to_4h",))),
           ("self_attention.dense", "mlp.dense_4h_to_h"), _bloom_refuse),
    Family("Falcon", ("falcon",), "transformer.h", _falcon_groups,
           ("self_attention.dense", "mlp.dense_4h_to_h"), _falcon_refuse),
)

BY_MODEL_TYPE: Mapping[str, Family] = {model_type: family for family in FAMILIES for model_type in family.model_types}


def family_for(model_type: str | None) -> Family | None:
    return BY_MODEL_TYPE.get((model_type or "").strip().lower())


def supported_model_types() -> list[str]:
    return sorted(BY_MODEL_TYPE)
