"""The local container check's argument logic (tests/container/local_container_check.py), which decides what
a user's build runs on: the made base's own name, the Debian mirror read from the machine's apt sources, and
podman's private configuration. The build and run themselves take minutes and are recorded in RESULTS.md."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "tests" / "container" / "local_container_check.py"


@pytest.fixture(scope="module")
def check():
    spec = importlib.util.spec_from_file_location("local_container_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_made_base_has_its_own_name_and_never_shadows_the_official_image(check, monkeypatch):
    monkeypatch.setattr(check, "debian_mirror", lambda: "http://mirror.example/debian")
    made = check.parse_args(["--model-dir", "m", "--make-base"])
    assert made.base_image == "localhost/lmi-debian-base:bookworm" != "python:3.11-slim-bookworm"
    assert made.debian_mirror == "http://mirror.example/debian"
    assert check.parse_args(["--model-dir", "m"]).base_image == "python:3.11-slim-bookworm"
    chosen = check.parse_args(["--model-dir", "m", "--make-base", "--base-image", "localhost/mine:1",
                               "--debian-mirror", "http://other/debian"])
    assert (chosen.base_image, chosen.debian_mirror) == ("localhost/mine:1", "http://other/debian")


def test_the_mirror_comes_from_the_machines_apt_sources(check, tmp_path):
    (tmp_path / "sources.list.d").mkdir()
    assert check.debian_mirror(tmp_path) == "http://deb.debian.org/debian"  # nothing configured
    (tmp_path / "sources.list.d" / "debian.sources").write_text(
        "Types: deb\n# a comment\nURIs: http://mirror.internal:3142/debian/\nSuites: bookworm bookworm-updates\n"
        "Components: main\n\nTypes: deb\nURIs: http://mirror.internal:3142/debian-security\n"
        "Suites: bookworm-security\nComponents: main\n")
    assert check.debian_mirror(tmp_path) == "http://mirror.internal:3142/debian"
    (tmp_path / "sources.list").write_text("# deb http://commented/debian bookworm main\n"
                                           "deb [arch=amd64] https://apt.example.com/debian bookworm main contrib\n")
    assert check.debian_mirror(tmp_path) == "https://apt.example.com/debian"  # sources.list is read first
    (tmp_path / "sources.list").write_text("deb https://packages.cloud.google.com/apt cloud-sdk-bookworm main\n")
    assert check.debian_mirror(tmp_path) == "http://mirror.internal:3142/debian"  # not a Debian mirror


def test_the_private_podman_configuration_is_the_recipe_that_runs_here(check, tmp_path):
    environment = check.private_podman_config(tmp_path / "podman")
    storage = Path(environment["CONTAINERS_STORAGE_CONF"]).read_text()
    containers = Path(environment["CONTAINERS_CONF"]).read_text()
    assert 'driver = "vfs"' in storage and f'graphroot = "{(tmp_path / "podman").resolve()}/storage"' in storage
    assert 'runtime = "runc"' in containers and '"nofile=20000:20000"' in containers and '"nproc=4096:4096"' in containers
    assert environment["BUILDAH_ISOLATION"] == "chroot"
