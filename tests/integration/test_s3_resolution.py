"""s3:// model ids against a real S3 API: a moto server on a loopback port, reached over HTTP through the
same AWS_ENDPOINT_URL_S3 variable users set for S3-compatible stores."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterator

import boto3
import pytest
from moto.server import ThreadedMotoServer

from entrypoint.model_resolution import ModelResolutionError, read_model_config, resolve_model

BUCKET = "models"
CREDENTIALS = {"aws_access_key_id": "testing", "aws_secret_access_key": "testing", "region_name": "us-east-1"}

# A tiny model directory: what matters is the file set and the bytes, not that it loads.
MODEL_FILES: dict[str, bytes] = {
    "config.json": json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"],
                               "num_attention_heads": 4, "num_hidden_layers": 2}).encode(),
    "generation_config.json": b'{"eos_token_id": 2}',
    "tokenizer.json": b'{"version": "1.0"}',
    "tokenizer_config.json": b'{"chat_template": "{{ messages }}"}',
    "chat_template.jinja": b"{{ messages }}",
    "model.safetensors.index.json": b'{"weight_map": {}}',
    "model-00001-of-00002.safetensors": os.urandom(300_000),
    # Above boto3's 8 MiB multipart threshold, so ranged (parallel) downloads are exercised too.
    "model-00002-of-00002.safetensors": os.urandom(9 * 1024 * 1024),
    "original/params.json": b'{"dim": 64}',
}
WEIGHTS = {"model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"}


@pytest.fixture(scope="module")
def s3_endpoint() -> Iterator[str]:
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    client = boto3.session.Session().client("s3", endpoint_url=endpoint, **CREDENTIALS)
    client.create_bucket(Bucket=BUCKET)
    for name, data in MODEL_FILES.items():
        client.put_object(Bucket=BUCKET, Key=f"llama/{name}", Body=data)
    # A sibling whose name starts like the model's prefix: must not leak into s3://models/llama.
    client.put_object(Bucket=BUCKET, Key="llama-2/config.json", Body=b"{}")
    client.put_object(Bucket=BUCKET, Key="no-config/model.safetensors", Body=b"x")
    yield endpoint
    server.stop()


@pytest.fixture
def aws_env(s3_endpoint: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """Point boto3 at the moto server the way a user would, and away from any real AWS configuration."""
    for variable in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL"):
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", s3_endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")  # no instance-metadata probing without credentials
    return s3_endpoint


def local_files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def mtimes(root: Path) -> dict[str, int]:
    return {p.relative_to(root).as_posix(): p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}


def test_download_reproduces_the_files(aws_env: str, tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    resolved = resolve_model("s3://models/llama", model_dir=tmp_path / "unused", cache_dir=tmp_path / "cache")
    assert resolved.source == "s3"
    assert resolved.path == tmp_path / "cache" / "s3" / "models" / "llama"
    assert "s3://models/llama" in resolved.description and str(resolved.path) in resolved.description
    assert local_files(resolved.path) == MODEL_FILES  # byte for byte, no partial files, no llama-2 sibling
    assert read_model_config(resolved)["num_hidden_layers"] == 2
    assert "s3://models/llama" in capfd.readouterr().err  # the progress bar goes to stderr


def test_second_resolution_downloads_nothing(aws_env: str, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    path = resolve_model("s3://models/llama/", model_dir=tmp_path, cache_dir=cache, progress=False).path
    before = mtimes(path)
    assert resolve_model("s3://models/llama", model_dir=tmp_path, cache_dir=cache, progress=False).path == path
    assert mtimes(path) == before

    # An interrupted earlier run: one file missing, one truncated. Only those two are fetched again.
    (path / "tokenizer.json").unlink()
    (path / "model-00001-of-00002.safetensors").write_bytes(b"truncated")
    resolve_model("s3://models/llama", model_dir=tmp_path, cache_dir=cache, progress=False)
    assert local_files(path) == MODEL_FILES
    after = mtimes(path)
    changed = {name for name in after if after[name] != before[name]}
    assert changed == {"tokenizer.json", "model-00001-of-00002.safetensors"}


def test_config_only_skips_weights(aws_env: str, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    resolved = resolve_model("s3://models/llama", model_dir=tmp_path, cache_dir=cache, config_only=True, progress=False)
    assert local_files(resolved.path) == {name: data for name, data in MODEL_FILES.items() if name not in WEIGHTS}
    assert read_model_config(resolved)["architectures"] == ["LlamaForCausalLM"]
    # The full resolution afterwards fetches just the weights.
    resolve_model("s3://models/llama", model_dir=tmp_path, cache_dir=cache, progress=False)
    assert local_files(resolved.path) == MODEL_FILES


def test_missing_bucket(aws_env: str, tmp_path: Path) -> None:
    with pytest.raises(ModelResolutionError) as error:
        resolve_model("s3://no-such-bucket/llama", model_dir=tmp_path, cache_dir=tmp_path / "cache")
    message = str(error.value)
    for expected in ("s3://no-such-bucket/llama", "'no-such-bucket' does not exist", aws_env, "AWS_ENDPOINT_URL_S3"):
        assert expected in message


def test_empty_prefix(aws_env: str, tmp_path: Path) -> None:
    with pytest.raises(ModelResolutionError) as error:
        resolve_model("s3://models/nothing-here", model_dir=tmp_path, cache_dir=tmp_path / "cache")
    message = str(error.value)
    assert "no objects under s3://models/nothing-here/" in message and aws_env in message


def test_prefix_without_config_json(aws_env: str, tmp_path: Path) -> None:
    expected = r"no config.json directly under s3://models/no-config/.*found: model.safetensors"
    with pytest.raises(ModelResolutionError, match=expected):
        resolve_model("s3://models/no-config", model_dir=tmp_path, cache_dir=tmp_path / "cache")


def test_missing_credentials(aws_env: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    with pytest.raises(ModelResolutionError) as error:
        resolve_model("s3://models/llama", model_dir=tmp_path, cache_dir=tmp_path / "cache")
    message = str(error.value)
    assert "s3://models/llama" in message and "AWS_ACCESS_KEY_ID" in message and "AWS_SECRET_ACCESS_KEY" in message


def test_uri_without_bucket(tmp_path: Path) -> None:
    with pytest.raises(ModelResolutionError, match="no bucket name"):
        resolve_model("s3:///llama", model_dir=tmp_path, cache_dir=tmp_path / "cache")


SLOW_DOWNLOAD = """
import sys, time
import entrypoint.model_resolution as resolution

download = resolution._S3Download._download

def slowly(self, rel, on_bytes):  # a slow link: the download is still running when the process is killed
    def throttled(count):
        on_bytes(count)
        time.sleep(0.5)
    download(self, rel, throttled)

resolution._S3Download._download = slowly
resolution.resolve_model("s3://models/llama", model_dir=sys.argv[1], cache_dir=sys.argv[2], progress=False)
"""


def test_a_killed_download_leaves_nothing_a_later_start_uses(aws_env: str, tmp_path: Path) -> None:
    import signal
    import subprocess
    import sys
    import time

    cache = tmp_path / "cache"
    target = cache / "s3" / BUCKET / "llama"
    process = subprocess.Popen([sys.executable, "-c", SLOW_DOWNLOAD, str(tmp_path / "unused"), str(cache)],
                               cwd=Path(__file__).resolve().parents[2], env=os.environ.copy())
    try:
        deadline = time.monotonic() + 120
        while not any(p.stat().st_size > 0 for p in target.rglob("*.partial*") if p.is_file()):
            assert process.poll() is None, "the download ended before it could be interrupted"
            assert time.monotonic() < deadline, "no partial download appeared"
            time.sleep(0.05)
        process.send_signal(signal.SIGKILL)  # no cleanup can run: as a container killed mid-download
        process.wait(30)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(30)
    # Only complete files carry their real names; the interrupted one exists only under its temporary name.
    for path in target.rglob("*"):
        if path.is_file() and ".partial" not in path.name:
            assert path.read_bytes() == MODEL_FILES[path.relative_to(target).as_posix()], path
    assert len([p for p in target.rglob("*") if p.is_file() and ".partial" not in p.name]) < len(MODEL_FILES)

    resolved = resolve_model("s3://models/llama", model_dir=tmp_path / "unused", cache_dir=cache, progress=False)
    assert local_files(resolved.path) == MODEL_FILES  # complete, byte for byte, and no temporary files left
