"""A model's shape as the planner needs it, read from its Hugging Face config dict (no torch, no weights)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Mapping

# Where HF configs keep each number, in probe order (the same names DeepSpeed's AutoTP probes, so the
# divisibility check here agrees with how AutoTP will shard).
_LAYER_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers")
_HEAD_KEYS = ("num_attention_heads", "num_heads", "n_heads", "n_head", "attention_heads")
_KV_HEAD_KEYS = ("num_key_value_heads", "num_kv_heads", "multi_query_group_num", "n_head_kv", "kv_n_heads")
_HIDDEN_KEYS = ("hidden_size", "n_embd", "d_model")
_CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "n_ctx", "max_sequence_length", "seq_length")
_DTYPE_KEYS = ("torch_dtype", "dtype")  # transformers 4 writes torch_dtype, 5 writes dtype
_CHECKPOINT_DTYPES = {"float16": "fp16", "half": "fp16", "bfloat16": "bf16", "float32": "fp32", "float": "fp32"}


@dataclass(frozen=True)
class ModelShape:
    model_type: str | None
    architecture: str | None  # config["architectures"][0], e.g. LlamaForCausalLM
    layers: int | None
    heads: int | None
    kv_heads: int | None  # equals heads for plain multi-head attention
    hidden_size: int | None
    context: int | None
    checkpoint_dtype: str | None  # fp32 / fp16 / bf16, as config.json records it
    rms_norm_eps: float | None

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> "ModelShape":
        outer = config
        # Multimodal configs keep the language model's numbers under text_config (as AutoTP does).
        if isinstance(config.get("text_config"), Mapping):
            config = config["text_config"]
        model_type = outer.get("model_type") or config.get("model_type")
        architectures = outer.get("architectures") or config.get("architectures") or [None]
        heads = _first(config, _HEAD_KEYS)
        dtype = _first(config, _DTYPE_KEYS) or _first(outer, _DTYPE_KEYS)
        dtype_text = str(dtype).removeprefix("torch.").lower() if dtype is not None else None
        eps = config.get("rms_norm_eps")
        return cls(
            model_type=str(model_type).lower() if model_type else None,
            architecture=architectures[0],
            layers=_first(config, _LAYER_KEYS),
            heads=heads,
            kv_heads=_first(config, _KV_HEAD_KEYS) or heads,
            hidden_size=_first(config, _HIDDEN_KEYS),
            context=_first(config, _CONTEXT_KEYS),
            checkpoint_dtype=_CHECKPOINT_DTYPES.get(dtype_text, dtype_text) if dtype_text else None,
            rms_norm_eps=float(eps) if isinstance(eps, (int, float)) else None,
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _first(config: Mapping[str, Any], keys: tuple[str, ...]) -> Any:
    for key in keys:
        value = config.get(key)
        if value is not None:
            return value
    return None
