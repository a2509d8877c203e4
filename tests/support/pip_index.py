"""pip pointed at a package index the test controls: a local directory of wheels (a "find-links" index, a
real pip feature for offline installs), or an address where nothing answers (a machine offline).

Both replace the whole pip configuration of the test process (pip.conf files and `PIP_*` variables), so the
machine's own settings (mirrors, constraints, a local wheel directory) cannot change what the test sees.
"""

from __future__ import annotations

import base64
import hashlib
import os
import zipfile
from pathlib import Path

import pytest

from tests.support.ports import free_port


def isolate_pip(monkeypatch: pytest.MonkeyPatch, **settings: str) -> None:
    """Make `settings` (PIP_* variables) pip's whole configuration."""
    for name in list(os.environ):
        if name.startswith("PIP_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)  # pip then reads no configuration file at all
    for name, value in settings.items():
        monkeypatch.setenv(name, value)


@pytest.fixture
def offline_pip(monkeypatch: pytest.MonkeyPatch) -> None:
    """pip's only index is a loopback port nobody listens on, and it does not retry."""
    isolate_pip(monkeypatch, PIP_INDEX_URL=f"http://127.0.0.1:{free_port()}/simple", PIP_RETRIES="0",
                PIP_TIMEOUT="10")


def build_wheel(directory: Path, name: str, version: str, files: dict[str, bytes]) -> Path:
    """A minimal valid wheel (PEP 427: the files, plus METADATA, WHEEL and RECORD in .dist-info)."""
    distribution = name.replace("-", "_")
    info = f"{distribution}-{version}.dist-info"
    contents = dict(files)
    contents[f"{info}/METADATA"] = f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n".encode()
    contents[f"{info}/WHEEL"] = b"Wheel-Version: 1.0\nGenerator: lmi-tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
    record = []
    for path, data in contents.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        record.append(f"{path},sha256={digest},{len(data)}")
    record.append(f"{info}/RECORD,,")
    contents[f"{info}/RECORD"] = ("\n".join(record) + "\n").encode()
    directory.mkdir(parents=True, exist_ok=True)
    wheel = directory / f"{distribution}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        for path, data in contents.items():
            archive.writestr(path, data)
    return wheel
