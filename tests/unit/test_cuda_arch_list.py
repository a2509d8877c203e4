"""TORCH_CUDA_ARCH_LIST as NVIDIA's images set it must reach DeepSpeed's op builder in a form it parses."""

from __future__ import annotations

import pytest

from entrypoint import cli
from handlers.cuda_arch_list import normalized_arch_list


@pytest.mark.parametrize("value, expected", [
    ("9.0a", "9.0"),  # the H200 machine's own setting, which broke every DeepSpeed JIT build
    ("8.0 8.6 8.9 9.0a", "8.0;8.6;8.9;9.0"),
    ("9.0a;9.0", "9.0"),
    ("8.0;9.0a+PTX", "8.0;9.0+PTX"),
    ("10.0f;12.0a", "10.0;12.0"),
    (" 7.5 ; 8.0 ", "7.5;8.0"),
    ("Hopper", "Hopper"),  # a name PyTorch understands: left to it
])
def test_suffixes_are_dropped_and_ptx_kept(value, expected):
    assert normalized_arch_list(value) == expected


class _Builder:
    """DeepSpeed's CUDA op builder with nothing to build: its `compute_capability_args` is the parser."""

    @staticmethod
    def gencode(monkeypatch, value: str) -> list[str]:
        from deepspeed.ops.op_builder.builder import CUDAOpBuilder

        class Builder(CUDAOpBuilder):
            BUILD_VAR, NAME = "DS_BUILD_NOTHING", "nothing"

            def __init__(self):
                super().__init__(name="nothing")

            def absolute_name(self):
                return "nothing"

            def sources(self):
                return []

        monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", value)
        builder = Builder()
        builder.jit_mode = False  # cross-compile mode: the list comes from the variable alone, no GPU needed
        return builder.compute_capability_args()


def test_deepspeeds_own_builder_fails_on_the_suffix_and_accepts_the_result(monkeypatch):
    with pytest.raises(ValueError, match="0a"):
        _Builder.gencode(monkeypatch, "8.0;9.0a")
    flags = _Builder.gencode(monkeypatch, normalized_arch_list("8.0;9.0a"))
    assert flags == ["-gencode=arch=compute_80,code=sm_80", "-gencode=arch=compute_90,code=sm_90"]


def test_serve_rewrites_the_variable_that_ranks_inherit(caplog):
    environ = {"TORCH_CUDA_ARCH_LIST": "9.0a"}
    with caplog.at_level("INFO"):
        cli._normalize_cuda_arch_list(environ)
    assert environ["TORCH_CUDA_ARCH_LIST"] == "9.0"
    assert "9.0a" in caplog.text and "rewritten" in caplog.text
    untouched = {"TORCH_CUDA_ARCH_LIST": "8.0;9.0"}
    cli._normalize_cuda_arch_list(untouched)
    assert untouched == {"TORCH_CUDA_ARCH_LIST": "8.0;9.0"}
    empty: dict[str, str] = {}
    cli._normalize_cuda_arch_list(empty)
    assert empty == {}
