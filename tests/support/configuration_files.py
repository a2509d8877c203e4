"""Loading the server's configuration the way it starts: a model directory that may hold serving.properties,
and an environment of its own."""

from __future__ import annotations

from pathlib import Path

from entrypoint.configuration import Configuration, load_configuration


def load_from(model_dir: Path, properties: str | None = None, **environ: str) -> Configuration:
    """`load_configuration` of `model_dir` (writing `properties` as its serving.properties first) and `environ`."""
    if properties is not None:
        (model_dir / "serving.properties").write_text(properties)
    return load_configuration(model_dir, environ)
