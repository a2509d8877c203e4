"""`option.checkpoint`: serve weights other than the model directory's own.

LMI's DeepSpeed handler passed `checkpoint` to `deepspeed.init_inference`: a DeepSpeed checkpoint
description (JSON naming the weight files). Here it names, inside the model directory, either one
`.safetensors` file or such a JSON (`{"type": "ds_model", "checkpoints": [...], "version": 1.0}`) whose
files are safetensors. Config and tokenizer still come from the directory.

Rather than re-implement loading, the named files are presented to transformers as an ordinary checkpoint:
a directory of symbolic links (config, tokenizer and the named weights as `model.safetensors` or with a
`model.safetensors.index.json`), so `from_pretrained` applies its own key renames and tied weights, and the
tensor-parallel loader reads its slices the same way. Pickle files (`.bin`, `.pt`) are refused: loading
them runs arbitrary code.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt")
WEIGHT_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")


class CheckpointError(ValueError):
    """`option.checkpoint` names something that cannot be loaded (a user error: exit 2, no traceback)."""


def checkpoint_files(model_dir: Path, checkpoint: str) -> list[Path]:
    """The safetensors files `checkpoint` names, checked to exist inside `model_dir`."""
    path = _inside(model_dir, checkpoint, "checkpoint")
    if path.suffix == ".safetensors":
        return [path]
    if path.suffix != ".json":
        raise CheckpointError(f"checkpoint={checkpoint}: expected a .safetensors file or a DeepSpeed checkpoint JSON "
                              f"in {model_dir}{_pickle_hint(path)}")
    try:
        description = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as error:
        raise CheckpointError(f"checkpoint={checkpoint}: cannot read {path} as JSON: {error}") from None
    if not isinstance(description, dict) or not isinstance(description.get("checkpoints"), list):
        raise CheckpointError(f"checkpoint={checkpoint}: {path} is not a DeepSpeed checkpoint description "
                              '(expected {"type": "ds_model", "checkpoints": ["file.safetensors", ...]})')
    kind = str(description.get("type", "ds_model"))
    if kind.lower() not in ("ds_model", "hf"):
        raise CheckpointError(f"checkpoint={checkpoint}: type {kind!r} is not supported (only ds_model: full, "
                              "unsharded weights; Megatron and pre-sharded BLOOM layouts are not)")
    tp_size = description.get("tp_size", 1)
    if description.get("parallelization") == "tp" and tp_size not in (1, None):
        raise CheckpointError(f"checkpoint={checkpoint}: pre-sharded (tp_size={tp_size}) checkpoints are not supported; "
                              "give the full weights: each rank loads its own slices of them")
    files = []
    for name in description["checkpoints"]:
        file = _inside(model_dir, str(name), f"checkpoint {checkpoint} lists {name}:")
        if file.suffix != ".safetensors":
            raise CheckpointError(f"checkpoint={checkpoint} lists {name}, which is not a .safetensors file"
                                  f"{_pickle_hint(file)}")
        files.append(file)
    if not files:
        raise CheckpointError(f"checkpoint={checkpoint}: {path} lists no checkpoint files")
    return files


def checkpoint_view(model_dir: Path, checkpoint: str) -> Path:
    """A directory that looks like `model_dir` with the weights `checkpoint` names (see the module doc)."""
    files = checkpoint_files(model_dir, checkpoint)
    view = Path(tempfile.mkdtemp(prefix="lmi-checkpoint-"))
    for entry in model_dir.iterdir():
        if entry.suffix in WEIGHT_SUFFIXES or entry.name in WEIGHT_INDEXES or entry.name == Path(checkpoint).name:
            continue
        (view / entry.name).symlink_to(entry.resolve())
    if len(files) == 1:
        (view / "model.safetensors").symlink_to(files[0].resolve())
        return view
    from safetensors import safe_open

    weight_map = {}
    for index, file in enumerate(files):
        name = f"model-{index + 1:05d}-of-{len(files):05d}.safetensors"
        (view / name).symlink_to(file.resolve())
        with safe_open(str(file), framework="pt") as handle:
            weight_map.update({key: name for key in handle.keys()})
    (view / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return view


def _inside(model_dir: Path, name: str, what: str) -> Path:
    path = (model_dir / name).resolve()
    if model_dir.resolve() not in path.parents:
        raise CheckpointError(f"{what} {name} is outside the model directory {model_dir}")
    if not path.is_file():
        raise CheckpointError(f"{what} {name}: no such file in {model_dir}")
    return path


def _pickle_hint(path: Path) -> str:
    if path.suffix in (".bin", ".pt", ".pth", ".ckpt"):
        return ("; pickle checkpoints are refused because loading them runs arbitrary code: convert with "
                "save_pretrained(safe_serialization=True)")
    return ""
