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
4. Attention atoms. The blocked attention sizes its buffer of attention atoms by `max_ragged_sequence_count`
   (`modules/implementations/attention/dense_blocked_attention.py`: `self._max_atoms = max_sequences`), but a
   `put` needs one atom per `q_block_size` query tokens of each sequence, and the C++ atom builder has no
   bounds check: the tokens of every atom past the buffer get no attention (garbage logits for the sequences
   placed last; 170-410x HF fp16's deviation measured on an H200, shared/FACTS.md). The state manager is
   therefore built with room for the most atoms any step our scheduler can build needs (`attention_atoms`).

Everything here patches DeepSpeed's classes by subclassing them at build time, so an upgrade that fixes a
defect upstream only makes a bridge redundant, never wrong.
"""

from __future__ import annotations

import importlib
import logging
import math
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


def bridged_model_class(model_type: str, bridges: Bridges, int8_linear: bool = False) -> type:
    """A subclass of DeepSpeed's v2 model implementation for `model_type` that carries the bridges, and with
    `int8_linear` W8A8 linear layers (handlers.fastgen_int8) in every transformer layer."""
    from deepspeed.accelerator import get_accelerator
    from deepspeed.inference.v2.modules.configs import PositionalEmbeddingType, RotateHalfConfig

    model_cls = typing.get_type_hints(_policy_class(model_type).instantiate_model)["return"]
    base = _int8_model_class(model_cls) if int8_linear else model_cls

    class BridgedModel(base):  # type: ignore[misc, valid-type]
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


def _int8_model_class(model_cls: type) -> type:
    """`model_cls` whose four linear layers per transformer layer are W8A8 (their weights are quantized as
    they load: v2 calls each layer's `transform_param` on the checkpoint's tensors)."""
    from handlers.fastgen_int8 import replace_linear

    class Int8Model(model_cls):  # type: ignore[misc, valid-type]
        def make_qkv_layer(self) -> None:
            super().make_qkv_layer()
            self.qkv = replace_linear(self.qkv)

        def make_attn_out_layer(self) -> None:
            super().make_attn_out_layer()
            self.attn_out = replace_linear(self.attn_out)

        def make_mlp_1_layer(self) -> None:
            super().make_mlp_1_layer()
            self.mlp_1 = replace_linear(self.mlp_1)

        def make_mlp_2_layer(self) -> None:
            super().make_mlp_2_layer()
            self.mlp_2 = replace_linear(self.mlp_2)

    Int8Model.__name__ = Int8Model.__qualname__ = f"Int8{model_cls.__name__}"
    return Int8Model


def bridged_policy_class(model_type: str, bridges: Bridges, int8_linear: bool = False) -> type:
    """A subclass of DeepSpeed's policy for `model_type` that builds the bridged model."""
    policy_cls = _policy_class(model_type)
    BridgedModel = bridged_model_class(model_type, bridges, int8_linear)  # noqa: N806 - a class

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


#: the module the `deepspeed-kernels` package installs (its wheel holds dskernels/libblockedflash.so, the
#: blocked flash attention FastGen's ops link against); `deepspeed_kernels` does not exist
KERNELS_MODULE = "dskernels"


def q_block_size(head_size: int, capability: tuple[int, int]) -> int:
    """Query tokens per attention atom, as DeepSpeed 0.19.8's `get_q_block_size`
    (kernels/ragged_ops/blocked_flash/blocked_flash.py) chooses them for a device of compute `capability`:
    128 up to head size 64, and up to 160 on x.0 devices (A100, H100, H200); 64 otherwise."""
    major, minor = capability
    if major < 8:
        raise FastGenUnsupported(f"DeepSpeed's blocked attention needs compute capability 8.0 or newer, not "
                                 f"{major}.{minor}")
    if head_size <= 64:
        return 128
    if head_size <= 160:
        return 128 if minor == 0 else 64
    if head_size <= 256:
        return 64
    raise FastGenUnsupported(f"head size {head_size}: DeepSpeed's blocked attention supports at most 256")


def attention_atoms(max_sequences: int, max_prefill_tokens: int, q_block: int) -> int:
    """The most attention atoms one step of the rolling batch can need: DeepSpeed's atom builder makes
    ceil(n / q) = 1 + floor((n - 1) / q) atoms for a sequence of n new tokens. A step puts one token for each
    of r running sequences and prefill chunks n_1..n_p (sum at most the prefill budget B) for p more
    (r + p <= S): r + sum(ceil(n_i / q)) <= r + p + floor((B - p) / q) <= S + floor((B - 1) / q), reached
    by S - 1 decodes and one chunk of a full budget (64 sequences, 4,096 tokens, q = 128: 95 atoms; the
    server's 64 before this was sized here)."""
    if max_sequences < 1 or max_prefill_tokens < 1:
        raise ValueError(f"max_sequences={max_sequences} and max_prefill_tokens={max_prefill_tokens} must be >= 1")
    return max_sequences + (max_prefill_tokens - 1) // q_block


def atoms_needed(token_counts: typing.Iterable[int], q_block: int) -> int:
    """Atoms DeepSpeed's atom builder makes for one `put` (atom_builder.cpp: ceil(n_tokens / q_block_size)
    per sequence)."""
    return sum(math.ceil(n / q_block) for n in token_counts)


@dataclass(frozen=True)
class EngineLimits:
    """The sizes DeepSpeed's state manager is built with (its buffers are allocated once, from these)."""

    max_sequences: int  # sequences in one ragged batch, and tracked at once
    max_prefill_tokens: int  # prompt tokens in one ragged batch (the decode tokens come on top)
    max_context: int  # tokens of one sequence, prompt and generation
    reserve_bytes: int  # device memory left free after the KV cache
    kv_blocks: int | None = None  # a fixed number of KV blocks instead (memory_config "allocate"; tests)

    @property
    def max_batch_tokens(self) -> int:
        """Tokens in one ragged batch: one per running sequence plus the prefill budget."""
        return self.max_prefill_tokens + self.max_sequences

    def atoms(self, q_block: int) -> int:
        return attention_atoms(self.max_sequences, self.max_prefill_tokens, q_block)

    def state_manager(self, q_block: int) -> dict[str, Any]:
        """DeepSpeed's `DSStateManagerConfig` for these limits on a device with this `q_block_size`.
        `max_ragged_sequence_count` sizes the attention-atom buffer (bridge 4), and its validator wants
        `max_tracked_sequences` and `max_ragged_batch_size` at least as large. DeepSpeed does not limit a
        put's sequences to anything smaller: our scheduler keeps each put to `max_sequences` sequences and
        `max_batch_tokens` tokens (and the runner checks every put's atoms, `AtomRoom`)."""
        atoms = self.atoms(q_block)
        memory = ({"mode": "allocate", "size": self.kv_blocks} if self.kv_blocks is not None
                  else {"mode": "reserve", "size": max(1, self.reserve_bytes)})
        return {"max_tracked_sequences": atoms, "max_ragged_sequence_count": atoms,
                "max_ragged_batch_size": max(self.max_batch_tokens, atoms), "max_context": self.max_context,
                "memory_config": memory}


@dataclass(frozen=True)
class AtomRoom:
    """The attention-atom buffer of a built engine: every put must need at most `atoms`."""

    atoms: int
    q_block: int

    def check(self, token_counts: typing.Sequence[int]) -> None:
        needed = atoms_needed(token_counts, self.q_block)
        if needed > self.atoms:  # DeepSpeed would compute garbage for the sequences placed last
            raise RuntimeError(f"a put of {len(token_counts)} sequences ({sum(token_counts)} tokens) needs {needed} "
                               f"attention atoms of {self.q_block} tokens; DeepSpeed's buffer holds {self.atoms}")


def build_fastgen_engine(model_path: str, hf_config: Any, limits: EngineLimits, dtype: Any,
                         tensor_parallel: int = 1, bridges: Bridges | None = None,
                         int8_linear: bool = False,
                         substitutes: Mapping[str, Any] | None = None) -> tuple[Any, Bridges, AtomRoom]:
    """DeepSpeed's `InferenceEngineV2` for the checkpoint at `model_path` in `dtype` (fp16/bf16), with the
    bridges applied (`bridges`: others than the config's, to measure DeepSpeed without them), with
    `int8_linear` W8A8 linear layers, and with `substitutes` (checkpoint name -> tensor: SmoothQuant's smoothed
    weights) loaded instead of the checkpoint's own tensors of those names; the KV cache takes what device
    memory is left after the weights and `limits.reserve_bytes`. Also returns the room its attention has for
    atoms, read back from the built module."""
    import torch
    from deepspeed.inference.v2 import InferenceEngineV2, RaggedInferenceEngineConfig
    from deepspeed.inference.v2.checkpoint import HuggingFaceCheckpointEngine

    checked = preflight(hf_config, limits.max_context)
    bridges = checked if bridges is None else bridges
    head_size, _ = attention_shape(hf_config)
    q_block = q_block_size(head_size, torch.cuda.get_device_capability())
    config = RaggedInferenceEngineConfig(tensor_parallel={"tp_size": tensor_parallel},
                                         state_manager=limits.state_manager(q_block))
    checkpoint = (HuggingFaceCheckpointEngine(model_path) if substitutes is None
                  else _substituted_checkpoint(HuggingFaceCheckpointEngine)(model_path, substitutes))
    # v2's models take their activation dtype from the config (`torch_dtype`), which says float32 for many
    # checkpoints saved that way; the plan's dtype is what is served.
    checkpoint.model_config.dtype = dtype
    policy = bridged_policy_class(hf_config.model_type, bridges, int8_linear)(checkpoint.model_config,
                                                                              checkpoint_engine=checkpoint)
    if tensor_parallel == 1:
        _single_process_group()
    try:
        engine = InferenceEngineV2(policy, config)
    except (AttributeError, KeyError, ValueError) as error:
        # DeepSpeed's containers expect the checkpoint's own names (a Falcon with tied embeddings saves no
        # lm_head.weight: "'UnembedParameter' object has no attribute 'dtype'"): another engine serves it
        raise FastGenUnsupported(f"DeepSpeed's FastGen could not build this checkpoint ({type(error).__name__}: "
                                 f"{error})") from error
    return engine, bridges, built_atom_room(engine, limits.atoms(q_block), q_block)


def _substituted_checkpoint(base: type) -> type:
    """DeepSpeed's Hugging Face checkpoint reader, yielding given tensors in place of the files' tensors of the
    same names; every given tensor must replace one (a checkpoint that names its tensors otherwise than the
    loaded model does would silently lose them)."""

    class SubstitutedCheckpoint(base):  # type: ignore[misc, valid-type]
        def __init__(self, model_path: str, substitutes: Mapping[str, Any]) -> None:
            super().__init__(model_path)
            self.substitutes = dict(substitutes)

        def parameters(self) -> Any:
            unused = set(self.substitutes)
            for name, tensor in super().parameters():
                if name in self.substitutes:
                    unused.discard(name)
                    tensor = self.substitutes[name].to(tensor.device, tensor.dtype)
                yield name, tensor
            if unused:
                raise FastGenUnsupported(f"the checkpoint has no tensors named {sorted(unused)[:3]} (of {len(unused)} "
                                         "smoothed ones): its names differ from the loaded model's")

    return SubstitutedCheckpoint


def _single_process_group() -> None:
    """DeepSpeed's engine joins a torch.distributed group even on one GPU; left to itself it rendezvouses on
    MASTER_PORT (29500), which a second server or test process on the host already holds (EADDRINUSE, measured
    on the H200). One process needs no network: a file store, which DeepSpeed then adopts."""
    import tempfile

    import torch.distributed as dist
    from deepspeed.accelerator import get_accelerator

    if dist.is_initialized():
        return
    with tempfile.NamedTemporaryFile(prefix="fastgen-group-", delete=False) as store:
        path = store.name
    dist.init_process_group(backend=get_accelerator().communication_backend_name(), init_method=f"file://{path}",
                            rank=0, world_size=1)


def built_atom_room(engine: Any, wanted: int, q_block: int) -> AtomRoom:
    """What the built attention module really holds (DeepSpeed's private `_max_atoms`, `q_block_size`): a
    DeepSpeed that sizes or blocks differently from what `state_manager` assumed is refused here instead of
    computing wrong logits."""
    attention = engine.model().attn
    held = int(getattr(attention, "_max_atoms", wanted))
    built_q_block = int(getattr(attention, "q_block_size", q_block))
    if built_q_block != q_block or held < wanted:
        raise FastGenUnsupported(f"DeepSpeed's attention holds {held} atoms of {built_q_block} query tokens; a step "
                                 f"of this engine can need {wanted} atoms of {q_block}")
    return AtomRoom(held, built_q_block)
