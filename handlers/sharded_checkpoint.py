"""Reading one tensor-parallel rank's slices of a safetensors checkpoint into a model that DeepSpeed AutoTP
sharded on the meta device.

Two questions decide which bytes a parameter gets, and each is answered by the library that owns it, not
by rules of ours:

- *Which checkpoint tensor?* transformers renames checkpoint keys on load (GPT-NeoX's `embed_out` becomes
  `lm_head`, legacy `gamma`/`beta` norms, ...) with a per-architecture list of transforms
  (`transformers.conversion_mapping.get_model_conversion_mapping`, applied by
  `core_model_loading.rename_source_key`, which also adds or strips the base-model prefix). We apply the
  same renamings. A transform that merges or splits tensors (a `WeightConverter`, e.g. stacking MoE
  experts) cannot be read slice by slice, so such a checkpoint is refused at degree > 1, naming the key.
  Tied parameters (`lm_head` sharing the embedding) come from `model.all_tied_weights_keys`.
- *Which part of it?* AutoTP does not always cut a tensor into equal contiguous blocks: fused q/k/v
  (`qkv_proj`, `query_key_value`, `c_attn`, `W_pack`) is cut per sub-parameter and reassembled, fused
  `gate_up_proj` per half, and sizes follow the head counts, so shards can be uneven. DeepSpeed 0.19.8
  records the exact layout on every parameter it shards (`DS_AUTOTP_UC_META`, the universal-checkpoint
  metadata, with an affine map: for each rank, the blocks of the full tensor its shard holds and where they
  go). We read exactly those blocks with `safe_open(...).get_slice`, so each rank reads only its own bytes,
  and DeepSpeed's description of its own layout decides them. A parameter whose layout DeepSpeed cannot
  describe (it records an `unsupported_reason`) is refused with that reason.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable


class UnshardableCheckpoint(RuntimeError):
    """The checkpoint cannot be loaded slice by slice at this tensor-parallel degree (the message says why)."""


def load_rank_slices(module: Any, files: dict[str, Path], sources: dict[str, str], rank: int,
                     progress: Callable[[str], None], show_progress: bool) -> None:
    """Fill every parameter of `module` (AutoTP-sharded, its memory uninitialised) with this rank's slice of
    the checkpoint. `files` is `tensor_files(...)`, `sources` is `checkpoint_sources(...)` of the model
    before AutoTP replaced its layers."""
    import torch
    from safetensors import safe_open
    from tqdm import tqdm

    handles = {path: safe_open(str(path), framework="pt") for path in set(files.values())}
    missing, loaded = [], set()
    parameters = list(module.named_parameters(remove_duplicate=False))
    for name, parameter in tqdm(parameters, desc="loading this rank's shard", unit="tensor", disable=not show_progress):
        if id(parameter) in loaded:
            continue  # a tied parameter still shared after sharding: loaded under its other name
        key = sources.get(name)
        if key is None:
            missing.append(name)
            continue
        full = handles[files[key]].get_slice(key)
        with torch.no_grad():
            parameter.copy_(read_rank_slice(full, tuple(full.get_shape()), parameter, rank, name, key))
        loaded.add(id(parameter))
    if missing:
        folder = next(iter(files.values())).parent if files else "?"
        raise RuntimeError(f"{len(missing)} parameters are not in the checkpoint at {folder} (after transformers' "
                           f"key mapping): {', '.join(missing[:5])}"
                           f"{' ...' if len(missing) > 5 else ''}")
    if show_progress:
        progress(f"loaded {len(loaded)} tensors (this rank's slices) from {len(handles)} safetensors file(s)")


def restore_shard_layouts(module: Any) -> None:
    """`init_inference` materialises the meta parameters as new Parameter objects (`module.to_empty`), which
    drops the layout AutoTP recorded on the old ones. Every AutoTP layer records it again on its current
    parameters from the split it froze when it was built (DeepSpeed's own `_mark_uc_metadata`)."""
    from deepspeed.module_inject.layers import TensorParallel_Layer

    for layer in module.modules():
        if isinstance(layer, TensorParallel_Layer):
            layer._mark_uc_metadata()


def checkpoint_sources(hf_model: Any, checkpoint_keys: list[str]) -> dict[str, str]:
    """model parameter name -> checkpoint key, by transformers' own renaming rules and tied-weight map."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightRenaming, rename_source_key

    transforms = get_model_conversion_mapping(hf_model)
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if not isinstance(t, WeightRenaming)]
    model_keys = dict.fromkeys(hf_model.state_dict(), True)  # rename_source_key looks names up in it
    sources: dict[str, str] = {}
    for key in checkpoint_keys:
        target, converter = rename_source_key(key, renamings, converters, hf_model.base_model_prefix, model_keys)
        if converter is not None:
            raise UnshardableCheckpoint(
                f"checkpoint tensor {key!r} is converted by transformers on load ({converter!r} -> {target!r}: it "
                f"merges or splits tensors), which tensor_parallel_degree > 1 cannot read slice by slice; "
                "use tensor_parallel_degree=1")
        sources.setdefault(target, key)
    tied = getattr(hf_model, "all_tied_weights_keys", None) or {}
    for target, source in tied.items():
        if target not in sources and source in sources:
            sources[target] = sources[source]
    return sources


def read_rank_slice(full: Any, full_shape: tuple[int, ...], parameter: Any, rank: int, name: str, key: str) -> Any:
    """This rank's part of checkpoint tensor `full` (a safetensors slice handle), laid out as AutoTP laid
    out `parameter`. Reads only the blocks the rank holds."""
    import torch
    from deepspeed.checkpoint.affine import ParamAffineMap
    from deepspeed.checkpoint.constants import DS_AUTOTP_UC_META

    meta = getattr(parameter, DS_AUTOTP_UC_META, None)
    if meta is None:  # AutoTP left it whole (norms, unsharded embeddings, biases it replicates)
        if tuple(parameter.shape) != full_shape:
            raise RuntimeError(f"{name}: this rank's tensor has shape {tuple(parameter.shape)} but AutoTP recorded "
                               f"no shard layout for it, and checkpoint tensor {key!r} has shape {full_shape}")
        return full[:]
    conversion = meta.get("conversion") or {}
    if conversion.get("unsupported_reason"):
        raise UnshardableCheckpoint(f"{name}: DeepSpeed AutoTP cannot describe how it shards this tensor "
                                    f"({conversion['unsupported_reason']}); use tensor_parallel_degree=1")
    if conversion.get("affine_map") is None:
        raise UnshardableCheckpoint(f"{name}: DeepSpeed AutoTP recorded no shard layout for this tensor "
                                    f"(partition_type={meta.get('partition_type')!r}); use tensor_parallel_degree=1")
    layout = ParamAffineMap.from_dict(conversion["affine_map"])
    if tuple(layout.logical_shape) != full_shape:
        raise RuntimeError(f"{name}: AutoTP sharded a tensor of shape {tuple(layout.logical_shape)}, but checkpoint "
                           f"tensor {key!r} has shape {full_shape}")
    shard = torch.empty(layout.shard_shapes[rank], dtype=parameter.dtype)
    whole = None
    for piece in layout.pieces_by_rank[rank]:
        box = _as_box(piece, full_shape)
        if box is not None:
            block = full[box]
        else:  # not a rectangular block of the full tensor: read the tensor once and let DeepSpeed view it
            whole = full[:].reshape(-1) if whole is None else whole
            block = piece.source_view(whole)
        target = piece.dest_view(shard)
        target.copy_(block)
        if piece.scale != 1.0:
            target.mul_(piece.scale)
    return shard


def _as_box(piece: Any, full_shape: tuple[int, ...]) -> tuple[slice, ...] | None:
    """The piece as index slices of the full tensor, when it is a rectangular block of it (every layout
    AutoTP produces for linear layers and embeddings is), else None."""
    strides = [1] * len(full_shape)
    for axis in range(len(full_shape) - 2, -1, -1):
        strides[axis] = strides[axis + 1] * full_shape[axis + 1]
    if len(piece.shape) != len(full_shape) or tuple(piece.source_strides) != tuple(strides):
        return None
    offset, box = piece.source_offset, []
    for size, stride, full_size in zip(piece.shape, strides, full_shape):
        start, offset = divmod(offset, stride)
        if start + size > full_size:
            return None
        box.append(slice(start, start + size))
    return tuple(box)


def tensor_files(model_path: Path) -> dict[str, Path]:
    """checkpoint tensor name -> safetensors file, from the index if the checkpoint is split."""
    index = model_path / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {name: model_path / file for name, file in weight_map.items()}
    single = model_path / "model.safetensors"
    if single.is_file():
        from safetensors import safe_open
        with safe_open(str(single), framework="pt") as handle:
            return {name: single for name in handle.keys()}
    raise RuntimeError(f"tensor_parallel_degree > 1 loads each rank's slice from safetensors, but {model_path} "
                       "has no model.safetensors or model.safetensors.index.json; convert the checkpoint with "
                       "save_pretrained(safe_serialization=True)")
