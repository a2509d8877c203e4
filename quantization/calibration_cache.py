"""Saved calibrations, so a restart does not calibrate again.

One file per (model, settings): `<cache dir>/smoothquant/<key>.pt`, where the key is a SHA-256 over
everything the result depends on: the model (its directory, config.json and the name, size and mtime of
every weight file, so a replaced checkpoint misses the cache), the activation dtype, the calibration text
(the file's path and contents hash, or the default corpus with the Python version that ships it), the
window count and length, the smoothquant_alpha setting, the smoothed groups (fewer under tensor
parallelism) and a format version. The file holds the
per-channel activation abs-max of every smoothed norm, the alpha used and, when it was searched, the
search's errors. It is written to a temporary file and renamed, so a reader never sees half a file.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".gguf")


def default_cache_dir() -> Path:
    """The same rule as entrypoint.model_resolution.default_cache_dir (quantization/ may not import
    entrypoint/; a test keeps the two in agreement): $LMI_CACHE_DIR, else $XDG_CACHE_HOME/lmi-deepspeed,
    else ~/.cache/lmi-deepspeed."""
    explicit = os.environ.get("LMI_CACHE_DIR", "").strip()
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME", "").strip()
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "lmi-deepspeed"


def model_fingerprint(model_path: str) -> dict[str, Any]:
    directory = Path(model_path).resolve()
    config = directory / "config.json"
    weights = sorted((file.name, file.stat().st_size, file.stat().st_mtime_ns)
                     for file in directory.iterdir() if file.suffix in _WEIGHT_SUFFIXES) if directory.is_dir() else []
    return {"path": str(directory),
            "config_sha256": hashlib.sha256(config.read_bytes()).hexdigest() if config.is_file() else None,
            "weights": weights}


def calibration_source_fingerprint(path: str | None) -> dict[str, Any]:
    if path is None:
        return {"default": "pydoc_data.topics", "python": sys.version.split()[0]}
    file = Path(path).expanduser().resolve()
    return {"path": str(file), "sha256": hashlib.sha256(file.read_bytes()).hexdigest()}


def cache_key(settings: dict[str, Any]) -> str:
    text = json.dumps({"format": FORMAT_VERSION, **settings}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def cache_file(cache_dir: Path, key: str) -> Path:
    return Path(cache_dir) / "smoothquant" / f"{key}.pt"


def load(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        record = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # a damaged file is recalibrated, not fatal
        logger.warning("ignoring the unreadable SmoothQuant calibration %s: %s", path, error)
        return None
    if not isinstance(record, dict) or record.get("format") != FORMAT_VERSION:
        return None
    return record


def save(path: Path, record: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(descriptor)
    try:
        torch.save({"format": FORMAT_VERSION, **record}, temporary)
        os.chmod(temporary, 0o644)
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)
