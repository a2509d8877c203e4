"""DeepSpeed-FastGen's ragged engine for a Hugging Face checkpoint, with the project's bridges over the defects
of DeepSpeed 0.19.8's inference v2 that were measured on an H200 (shared/FACTS.md, 2026-11-22 and -30):

1. Norm epsilon. v2 builds every RMSNorm/LayerNorm kernel with eps 1e-5 (`DSNormConfig.eps`'s default; the
   unembedding's final norm likewise) whatever the model's `rms_norm_eps` (Llama's and Qwen2's are 1e-6).
   The model's own eps is set on the kernels once they are built.
2. Rotary precision. v2's rotary kernel computes each inverse frequency and rounds it to fp16/bf16 before
   multiplying by the position, so the angle error grows linearly with position (teacher-forced logits 11x
   HF fp16's own deviation from fp32 at 600 positions, 34x at 2,000). v2's own "trained frequencies" path
   (`RotateHalfConfig(use_trained_freqs=True)`, `BlockedTrainedRotaryEmbeddings`, as its exaone4_5 model
   uses) takes fp32 inverse frequencies; they are taken from the Hugging Face model's own rotary class, so
   every static rope_type transformers computes (default, linear, llama3) is exactly HF's, which also
   serves Llama 3.1+ `rope_scaling`, which v2 refuses.
3. Scheduling. `put(do_checks=True)` raises TypeError in `can_schedule`; the rolling batch admits by free
   blocks itself and puts with `do_checks=False` (handlers.fastgen_runner).

Everything here patches DeepSpeed's classes by subclassing them at build time, so an upgrade that fixes a
defect upstream only makes a bridge redundant, never wrong.
"""

from __future__ import annotations

import importlib
import logging
import typing
from dataclasses import dataclass
from typing import Any, Mapping

logger = logging.getLogger(__name__)

#: model_type -> DeepSpeed's v2 policy class name (deepspeed/inference/v2/engine_factory.py's dispatch)
POLICIES: Mapping[str, str] = {
    "llama": "Llama2Policy", "mistral": "MistralPolicy", "mixtral": "MixtralPolicy", "opt": "OPTPolicy",
    "falcon": "FalconPolicy", "phi": "PhiPolicy", "phi3": "Phi3Policy", "qwen": "QwenPolicy",
    "qwen2": "Qwen2Policy", "qwen2_moe": "Qwen2MoePolicy", "exaone4": "Exaone4Policy",
    "exaone4_5": "Exaone4_5Policy",
}
#: model types whose v2 implementation already feeds fp32 frequencies of its own to the trained-rotary path
OWN_TRAINED_ROTARY = frozenset({"exaone4_5"})
#: rope types whose frequencies change with the sequence length at run time (transformers'
#: `dynamic_rope_update`), which one fixed frequency tensor cannot express
DYNAMIC_ROPE_TYPES = frozenset({"dynamic", "longrope"})
#: config keys that hold the norm epsilon, by family
EPS_KEYS = ("rms_norm_eps", "layer_norm_eps", "layer_norm_epsilon")


class FastGenUnsupported(Exception):
    """This model cannot be served correctly by FastGen; the message says why (the engine factory falls back
    to the next engine the plan allows)."""


@dataclass(frozen=True)
class Bridges:
    """What the bridged model needs from the Hugging Face config."""

    norm_eps: float | None  # None: the config names none (DeepSpeed's 1e-5 stays)
    inv_freqs: Any  # torch.Tensor [rotary_dim // 2] fp32, or None: no rotary, or the model's own path

    def describe(self) -> list[str]:
        notes = []
        if self.norm_eps is not None:
            notes.append(f"norm eps {self.norm_eps:g} passed to DeepSpeed's kernels (it uses 1e-5 otherwise)")
        if self.inv_freqs is not None:
            notes.append(f"fp32 rotary frequencies from the HF model ({self.inv_freqs.numel()} per head) through "
                         "DeepSpeed's trained-rotary kernel (its own path rounds them to fp16)")
        return notes


def norm_epsilon(hf_config: Any) -> float | None:
    for key in EPS_KEYS:
        value = getattr(hf_config, key, None)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    return None


def _rope_type(hf_config: Any) -> str | None:
    for source in (getattr(hf_config, "rope_parameters", None), getattr(hf_config, "rope_scaling", None)):
        if isinstance(source, dict):
            rope_type = source.get("rope_type", source.get("type"))
            if rope_type is not None:
                return str(rope_type)
    return None


def rotary_inverse_frequencies(hf_config: Any) -> Any:
    """The fp32 inverse frequencies HF's own rotary embedding computes for this config ([rotary_dim // 2],
    partial rotary included), or None for a model without rotary embeddings. Raises FastGenUnsupported for
    rotary variants one fixed tensor cannot express."""
    model_type = hf_config.model_type
    try:
        module = importlib.import_module(f"transformers.models.{model_type}.modeling_{model_type}")
    except ImportError as error:
        raise FastGenUnsupported(f"transformers has no modeling module for model_type {model_type!r}, so the "
                                 "exact rotary frequencies cannot be computed") from error
    classes = [getattr(module, name) for name in dir(module)
               if name.endswith("RotaryEmbedding") and not name.startswith("_")]
    if not classes:
        return None  # learned or no positions (OPT)
    rope_type = _rope_type(hf_config)
    if rope_type in DYNAMIC_ROPE_TYPES:
        raise FastGenUnsupported(f"rope_type={rope_type!r} changes the rotary frequencies with the sequence "
                                 "length, which DeepSpeed's kernel (one fixed frequency tensor) cannot do")
    rotary = classes[0](hf_config)
    scaling = float(getattr(rotary, "attention_scaling", 1.0))
    if abs(scaling - 1.0) > 1e-6:
        raise FastGenUnsupported(f"rope_type={rope_type!r} scales attention by {scaling:g}, which DeepSpeed's "
                                 "rotary kernel cannot apply")
    return rotary.inv_freq.detach().float().contiguous()


def attention_shape(hf_config: Any) -> tuple[int, int]:
    """(head size, query heads per KV head) as DeepSpeed's v2 models compute them."""
    heads = getattr(hf_config, "num_attention_heads", None) or getattr(hf_config, "n_head")
    head_size = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // heads
    if hf_config.model_type == "falcon":  # falcon/model.py's n_heads_kv: multi-query unless the new decoder
        new = getattr(hf_config, "new_decoder_architecture", False)
        kv_heads = hf_config.num_kv_heads if (new or not getattr(hf_config, "multi_query", False)) else 1
    else:
        kv_heads = getattr(hf_config, "num_key_value_heads", None) or heads
    return int(head_size), int(heads) // int(kv_heads)


def _check_kernel_shapes(hf_config: Any, trained_rotary: bool) -> None:
    """The KV-copy/rotary kernel each model uses accepts only some head sizes and query-per-KV-head ratios
    (`supported_head_sizes` / `supported_q_ratios` of deepspeed/inference/v2/kernels/ragged_ops/
    linear_blocked_kv_rotary): refuse here, by name, instead of failing inside DeepSpeed's build. The trained
    (fp32-frequency) rotary kernel the bridge uses accepts fewer ratios than the one it replaces."""
    from deepspeed.inference.v2.kernels.ragged_ops import BlockedTrainedRotaryEmbeddings, LinearBlockedKVCopy

    kernel = BlockedTrainedRotaryEmbeddings if trained_rotary else LinearBlockedKVCopy
    head_size, ratio = attention_shape(hf_config)
    if head_size not in kernel.supported_head_sizes:
        raise FastGenUnsupported(f"head size {head_size}: DeepSpeed's {kernel.__name__} supports "
                                 f"{kernel.supported_head_sizes}")
    if ratio not in kernel.supported_q_ratios:
        raise FastGenUnsupported(f"{ratio} query heads per KV head: DeepSpeed's {kernel.__name__} supports "
                                 f"{kernel.supported_q_ratios}")


def bridges_for(hf_config: Any) -> Bridges:
    if hf_config.model_type not in POLICIES:
        raise FastGenUnsupported(f"DeepSpeed 0.19.8's inference v2 has no implementation of {hf_config.model_type!r}")
    inv_freqs = None if hf_config.model_type in OWN_TRAINED_ROTARY else rotary_inverse_frequencies(hf_config)
    if hf_config.model_type not in OWN_TRAINED_ROTARY:
        _check_kernel_shapes(hf_config, trained_rotary=inv_freqs is not None)
    return Bridges(norm_epsilon(hf_config), inv_freqs)


def _set_epsilon(module: Any, eps: float) -> None:
    """DeepSpeed's norm kernels read `self.epsilon` at every call (kernels/core_ops/cuda_rms_norm,
    cuda_layer_norm); the norm and unembedding modules hold them as plain attributes."""
    children = list(vars(module).values()) + list(getattr(module, "_modules", {}).values())
    for value in children:
        if hasattr(value, "epsilon") and isinstance(value.epsilon, float):
            value.epsilon = eps


def _with_inv_freqs(attention: Any, inv_freqs: Any) -> Any:
    """DeepSpeed's attention module, called as the model implementations call it (`attn(qkv, kv_cache,
    batch)`), with the fp32 frequencies added as the trained-rotary path's fourth argument."""
    import torch

    class TrainedRotaryAttention(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = attention
            self.register_buffer("inv_freqs", inv_freqs, persistent=False)

        def forward(self, q_k_v: Any, kv_cache: Any, batch: Any) -> Any:
            return self.inner(q_k_v, kv_cache, batch, self.inv_freqs)

        def __getattr__(self, name: str) -> Any:  # kv_block_size, build_atoms, ...: the inner module's
            try:
                return super().__getattr__(name)
            except AttributeError:
                return getattr(self._modules["inner"], name)

    return TrainedRotaryAttention()


def _policy_class(model_type: str) -> type:
    from deepspeed.inference.v2 import model_implementations

    return getattr(model_implementations, POLICIES[model_type])


def bridged_model_class(model_type: str, bridges: Bridges) -> type:
    """A subclass of DeepSpeed's v2 model implementation for `model_type` that carries the bridges."""
    from deepspeed.accelerator import get_accelerator
    from deepspeed.inference.v2.modules.configs import PositionalEmbeddingType, RotateHalfConfig

    model_cls = typing.get_type_hints(_policy_class(model_type).instantiate_model)["return"]

    class BridgedModel(model_cls):  # type: ignore[misc, valid-type]
        @property
        def positional_embedding_config(self) -> Any:
            if bridges.inv_freqs is not None and self.positional_embedding_type == PositionalEmbeddingType.rotate_half:
                return RotateHalfConfig(use_trained_freqs=True)
            return super().positional_embedding_config

        def make_attn_layer(self) -> None:
            super().make_attn_layer()
            if bridges.inv_freqs is not None and self.positional_embedding_type == PositionalEmbeddingType.rotate_half:
                self.attn = _with_inv_freqs(self.attn, bridges.inv_freqs.to(get_accelerator().current_device()))

        def make_norm_layer(self) -> None:
            super().make_norm_layer()
            if bridges.norm_eps is not None:
                _set_epsilon(self.norm, bridges.norm_eps)

        def make_unembedding_layer(self) -> None:
            super().make_unembedding_layer()
            if bridges.norm_eps is not None:
                _set_epsilon(self.unembed, bridges.norm_eps)

    BridgedModel.__name__ = BridgedModel.__qualname__ = f"Bridged{model_cls.__name__}"
    return BridgedModel


def bridged_policy_class(model_type: str, bridges: Bridges) -> type:
    """A subclass of DeepSpeed's policy for `model_type` that builds the bridged model."""
    policy_cls = _policy_class(model_type)
    BridgedModel = bridged_model_class(model_type, bridges)  # noqa: N806 - a class

    class BridgedPolicy(policy_cls):  # type: ignore[misc, valid-type]
        def instantiate_model(self, engine_config: Any, mp_group: Any) -> Any:
            return BridgedModel(config=self._model_config, engine_config=engine_config, base_mp_group=mp_group)

    BridgedPolicy.__name__ = BridgedPolicy.__qualname__ = f"Bridged{policy_cls.__name__}"
    return BridgedPolicy


def preflight(hf_config: Any, max_context: int) -> Bridges:
    """Everything that can be decided from the config before anything loads: raises FastGenUnsupported for
    what FastGen cannot serve correctly, else returns the bridges the model needs."""
    if hf_config.model_type == "opt" and not getattr(hf_config, "do_layer_norm_before", True):
        raise FastGenUnsupported("DeepSpeed's FastGen refuses OPT with do_layer_norm_before=false (OPT-350m)")
    window = getattr(hf_config, "sliding_window", None)
    if window and getattr(hf_config, "use_sliding_window", True) is not False and window < max_context:
        raise FastGenUnsupported(f"sliding_window={window} is shorter than max_tokens={max_context}, and "
                                 "DeepSpeed's blocked attention attends over the whole context")
    return bridges_for(hf_config)


@dataclass(frozen=True)
class EngineLimits:
    """The sizes DeepSpeed's state manager is built with (its buffers are allocated once, from these)."""

    max_sequences: int  # sequences in one ragged batch, and tracked at once
    max_batch_tokens: int  # tokens in one ragged batch: every decode token plus the prefill budget
    max_context: int  # tokens of one sequence, prompt and generation
    reserve_bytes: int  # device memory left free after the KV cache


def build_fastgen_engine(model_path: str, hf_config: Any, limits: EngineLimits, dtype: Any,
                         tensor_parallel: int = 1) -> tuple[Any, Bridges]:
    """DeepSpeed's `InferenceEngineV2` for the checkpoint at `model_path` in `dtype` (fp16/bf16), with the
    bridges applied; the KV cache takes what device memory is left after the weights and
    `limits.reserve_bytes`."""
    from deepspeed.inference.v2 import InferenceEngineV2, RaggedInferenceEngineConfig
    from deepspeed.inference.v2.checkpoint import HuggingFaceCheckpointEngine

    bridges = preflight(hf_config, limits.max_context)
    config = RaggedInferenceEngineConfig(
        tensor_parallel={"tp_size": tensor_parallel},
        state_manager={
            "max_tracked_sequences": limits.max_sequences,
            "max_ragged_sequence_count": limits.max_sequences,
            "max_ragged_batch_size": max(limits.max_batch_tokens, limits.max_sequences),
            "max_context": limits.max_context,
            "memory_config": {"mode": "reserve", "size": max(1, limits.reserve_bytes)},
        })
    checkpoint = HuggingFaceCheckpointEngine(model_path)
    # v2's models take their activation dtype from the config (`torch_dtype`), which says float32 for many
    # checkpoints saved that way; the plan's dtype is what is served.
    checkpoint.model_config.dtype = dtype
    policy = bridged_policy_class(hf_config.model_type, bridges)(checkpoint.model_config, checkpoint_engine=checkpoint)
    return InferenceEngineV2(policy, config), bridges
