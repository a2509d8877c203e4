"""Whether DeepSpeed-FastGen can start on this machine, and what a plan that chooses it says, found before
anything loads: without importing deepspeed or torch (`plan` stays fast), from the installed packages and
DeepSpeed's record of its prebuilt ops. The engine's loader asks again at load time."""

from __future__ import annotations

import ast
import importlib.util
import math
import os
import shutil
from pathlib import Path
from typing import Callable

from handlers.engine_policy import CUDA
from handlers.model_shape import ModelShape
from handlers.serving_properties import ServingProperties


def kernels_missing(importable: Callable[[str], bool]) -> str | None:
    """Why FastGen cannot start on this machine before any weight is read, or None. The same check
    `handlers.fastgen_engine.load_fastgen_engine` makes at load time (which stays as a second line of
    defence), so that `plan` does not name an engine `serve` would then drop."""
    from handlers.fastgen_model import KERNELS_MODULE  # no torch at import; the module name lives there

    if importable(KERNELS_MODULE):
        return None
    return (f"the deepspeed-kernels package (module {KERNELS_MODULE}) is not installed: "
            "pip install 'lmi-deepspeed[gpu]' (FastGen's blocked flash attention lives in it)")


#: DeepSpeed's ops FastGen runs, by the names `installed_ops` records (the Dockerfile prebuilds them)
FASTGEN_OPS = ("inference_core_ops", "ragged_device_ops", "ragged_ops")


def deepspeed_directory() -> Path | None:
    """Where the installed deepspeed package is, found without importing it."""
    spec = importlib.util.find_spec("deepspeed")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def deepspeed_prebuilt_ops() -> dict[str, bool]:
    """The installed DeepSpeed's `installed_ops` (which ops its wheel carries compiled), read from its
    git_version_info_installed.py without importing deepspeed (that imports torch: `plan` stays fast)."""
    directory = deepspeed_directory()
    if directory is None:
        return {}
    path = directory / "git_version_info_installed.py"
    try:
        tree = ast.parse(path.read_text())
    except (OSError, SyntaxError):
        return {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "installed_ops" for t in node.targets):
            try:
                value = ast.literal_eval(node.value)
            except ValueError:
                return {}
            return {str(k): bool(v) for k, v in value.items()} if isinstance(value, dict) else {}
    return {}


#: where torch.utils.cpp_extension looks for the CUDA toolkit when CUDA_HOME is not set
DEFAULT_CUDA_HOME = Path("/usr/local/cuda")


def cuda_compiler() -> str | None:
    """The nvcc DeepSpeed's just-in-time build would use, found where torch.utils.cpp_extension looks for the
    CUDA toolkit (CUDA_HOME / CUDA_PATH, then nvcc on PATH, then /usr/local/cuda), or None."""
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    for candidate in ([Path(home, "bin", "nvcc")] if home else []) + [DEFAULT_CUDA_HOME / "bin" / "nvcc"]:
        if candidate.is_file():
            return str(candidate)
    return shutil.which("nvcc")


def fastgen_ops_unavailable() -> str | None:
    """Why DeepSpeed's FastGen ops could not load here, or None: each is prebuilt, or nvcc can build it on
    first use (about 2 minutes for all in parallel on 16 cores, longer serially). Without either, building
    FastGen would fail after the gate's reference had loaded; `plan` and the loader refuse it first."""
    prebuilt = deepspeed_prebuilt_ops()
    missing = [op for op in FASTGEN_OPS if not prebuilt.get(op)]
    if not missing or cuda_compiler() is not None:
        return None
    return (f"DeepSpeed's FastGen ops ({', '.join(missing)}) are not prebuilt in this installation and no CUDA "
            "compiler (nvcc) was found to build them: use the GPU image, which prebuilds them, or install the CUDA "
            "toolkit")


#: FastGen's RMSNorm (deepspeed/inference/v2/modules/configs/norm_config.py) ignores the model's eps.
FASTGEN_NORM_EPS = 1e-5


def unavailable(device_kind: str, importable: Callable[[str], bool]) -> str | None:
    """Why FastGen cannot start on this machine (its kernels, its ops), or None; the planner asks before it
    names FastGen. Only a GPU machine is asked: on a CPU the engine's devices already rule it out."""
    if device_kind != CUDA:
        return None
    return kernels_missing(importable) or fastgen_ops_unavailable()


def plan_notes(properties: ServingProperties, shape: ModelShape) -> list[str]:
    """What the plan says when it chooses FastGen: the norm eps it sets, and the correctness gate."""
    notes = []
    # isclose: GGUF metadata stores eps as float32 (1e-5 reads back as 9.9999997e-06).
    if shape.rms_norm_eps is not None and not math.isclose(shape.rms_norm_eps, FASTGEN_NORM_EPS, rel_tol=1e-5):
        notes.append(f"FastGen (DeepSpeed 0.19.8) builds its norms with eps={FASTGEN_NORM_EPS:g}; this model's "
                     f"rms_norm_eps={shape.rms_norm_eps:g} is set on them at load (handlers/fastgen_model.py)")
    notes.append("a correctness gate runs at start-up: FastGen's teacher-forced logits against the HF model's in "
                 "fp32 on random-id probes of 48, 600 and 2,000 positions, alone and in a full batch; if they "
                 "deviate more than twice as much as HF's own half precision, the next engine serves instead "
                 "(correctness_gate=false skips it)"
                 if properties.correctness_gate else
                 "correctness_gate=false: FastGen's logits are not checked against HF's at start-up")
    if properties.quantize is not None and properties.correctness_gate:
        notes.append(f"quantize={properties.quantize.value}: the gate's half-precision reference is HF with the "
                     "same quantization (AutoTP's W8A8 layers, the same smoothing), so FastGen's int8 layers must "
                     "compute as ours do on HF")
    return notes
