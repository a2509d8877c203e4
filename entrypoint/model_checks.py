"""Faults in a model directory that can be seen without loading it, found by `plan` (and so by `serve`
before the port opens) instead of by a loader 10 s later with a message that names neither the file nor
the property to change:

  - config.json without a model_type (`{}` included): transformers cannot tell the architecture;
  - a model_type this transformers does not know, without remote code (`auto_map`) to define it;
  - remote code (`auto_map`) for an unknown model_type while option.trust_remote_code is false: it would
    have to run the model directory's own Python code, which only trust_remote_code allows;
  - safetensors files that are truncated (the header says how long the file must be) or that the index
    (`model.safetensors.index.json`) names but that are missing;
  - pickle checkpoints (pytorch_model.bin, ...) that `torch.load(weights_only=True)` would refuse: loading
    them any other way can run code the file chose.
"""

from __future__ import annotations

import difflib
import json
import struct
from pathlib import Path
from typing import Any, Mapping

from entrypoint.model_resolution import ModelResolutionError, ResolvedModel

SAFETENSORS_INDEX = "model.safetensors.index.json"
#: the longest safetensors header the format allows (safetensors' own MAX_HEADER_SIZE, 100 MB)
MAX_HEADER_BYTES = 100_000_000


def check_model(resolved: ResolvedModel, config: Mapping[str, Any], trust_remote_code: bool) -> None:
    """Raise `ModelResolutionError` listing every fault found in `config` and the local weight files."""
    problems = config_problems(resolved, config, trust_remote_code)
    if resolved.source in ("local", "hf-cache"):  # s3 and embedded: weights are not here yet (config_only)
        problems += weight_problems(resolved.path)
    if problems:
        count = len(problems)
        raise ModelResolutionError(f"the model {resolved.description} cannot be served "
                                   f"({count} problem{'s' if count != 1 else ''}):\n"
                                   + "\n".join(f"  - {problem}" for problem in problems))


def config_problems(resolved: ResolvedModel, config: Mapping[str, Any], trust_remote_code: bool) -> list[str]:
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES  # no torch import

    where = resolved.path / "config.json"
    model_type = config.get("model_type")
    auto_map = config.get("auto_map")
    if not model_type and not auto_map:
        shown = json.dumps(config)[:200]
        return [f"{where} has no \"model_type\" (it is {shown}), so the architecture is unknown; it must be the "
                f"config.json that transformers' save_pretrained writes, e.g. {{\"model_type\": \"llama\", ...}}"]
    if model_type in CONFIG_MAPPING_NAMES:
        return []  # a built-in architecture: transformers uses its own code, whatever auto_map says
    if auto_map:
        if trust_remote_code:
            return []
        return [f"{where} defines model_type {model_type!r} with remote code (auto_map: "
                f"{', '.join(sorted(auto_map))}), which runs the model directory's own Python files; that is allowed "
                f"only with option.trust_remote_code=true (OPTION_TRUST_REMOTE_CODE=true or "
                f"HF_MODEL_TRUST_REMOTE_CODE=true). Set it only for a model whose code you trust."]
    close = difflib.get_close_matches(str(model_type), list(CONFIG_MAPPING_NAMES), n=3)
    hint = f"; did you mean {' or '.join(close)}?" if close else ""
    import transformers

    return [f"{where}: model_type {model_type!r} is not an architecture transformers {transformers.__version__} "
            f"knows, and config.json has no auto_map pointing at remote code that defines it{hint}"]


def weight_problems(directory: Path) -> list[str]:
    problems: list[str] = []
    index = directory / SAFETENSORS_INDEX
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
            problems.append(f"{index} is not a safetensors index (a JSON object with a weight_map): {error}")
            shards = []
        for shard in shards:
            if not (directory / shard).is_file():
                problems.append(f"{directory / shard} is missing: {SAFETENSORS_INDEX} maps tensors to it")
    for path in sorted(directory.glob("*.safetensors")):
        problem = safetensors_problem(path)
        if problem:
            problems.append(problem)
    pickles = sorted(path for suffix in PICKLE_SUFFIXES for path in directory.glob(f"*{suffix}"))
    problems += [problem for problem in map(pickle_problem, pickles) if problem]
    return problems


#: PyTorch checkpoint files: pickles, which can run arbitrary code when loaded without weights_only
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")


def pickle_problem(path: Path) -> str | None:
    """Why the pickle checkpoint `path` is refused, or None when `torch.load(weights_only=True)` can load it.

    torch's own scanner lists the globals the pickle references outside weights_only's allow-list without
    unpickling anything (torch.serialization.get_unsafe_globals_in_checkpoint, torch >= 2.5); any such global
    means loading it would run code the checkpoint chose, so it is refused rather than loaded unsafely."""
    import torch  # only when a pickle checkpoint is there: plan stays torch-free otherwise

    try:
        unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
    except Exception as error:  # noqa: BLE001 - legacy (non-zip) or corrupt files: cannot be vetted
        return (f"{path} is a pickle checkpoint that cannot be checked for safe loading ({type(error).__name__}: "
                f"{error}); convert it to safetensors")
    if unsafe:
        return (f"{path} is refused: it is a pickle that references {', '.join(sorted(unsafe)[:5])}, so loading it "
                f"could run arbitrary code (torch.load with weights_only=True refuses it); convert the checkpoint "
                f"to safetensors with code you trust")
    return None


def safetensors_problem(path: Path) -> str | None:
    """Why `path` is not a complete safetensors file, or None.

    The format (https://github.com/huggingface/safetensors#format): an 8-byte little-endian header length N,
    N bytes of JSON mapping each tensor to its `data_offsets` [begin, end) within the data that follows, so
    the file must be exactly 8 + N + max(end) bytes. Reading only the header keeps this cheap for any size;
    safetensors' own loader reports a short file without naming it."""
    size = path.stat().st_size
    try:
        with path.open("rb") as file:
            prefix = file.read(8)
            if len(prefix) < 8:
                return f"{path} is truncated: {size} bytes, shorter than the 8-byte safetensors header length"
            (header_bytes,) = struct.unpack("<Q", prefix)
            if header_bytes > MAX_HEADER_BYTES:
                return f"{path} is not a safetensors file: its header length field reads {header_bytes} bytes"
            if 8 + header_bytes > size:
                return (f"{path} is truncated: {size} bytes, but its header alone is {header_bytes} bytes "
                        f"(re-copy or re-download the file)")
            header = json.loads(file.read(header_bytes))
    except OSError as error:
        return f"{path} cannot be read: {error.strerror}"
    except ValueError as error:  # JSON or UTF-8
        return f"{path} is not a safetensors file: its header is not JSON ({error})"
    try:
        data_bytes = max((entry["data_offsets"][1] for name, entry in header.items() if name != "__metadata__"),
                         default=0)
    except (TypeError, KeyError, IndexError, AttributeError):
        return f"{path} is not a safetensors file: its header has no data_offsets for every tensor"
    expected = 8 + header_bytes + int(data_bytes)
    if size < expected:
        return (f"{path} is truncated: {size} bytes, but its header describes {expected} bytes "
                f"({len(header) - ('__metadata__' in header)} tensors); re-copy or re-download the file")
    return None
