"""Property-based tests of the configuration parser (hypothesis): whatever strings arrive in whichever keys,
from the environment or from serving.properties, the result is a valid configuration or a
`ConfigurationError` naming the problem, never another exception (a traceback at start-up)."""

from __future__ import annotations

import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from entrypoint.configuration import Configuration, ConfigurationError, load_configuration
from entrypoint.property_sources import COMPAT_ENV, LMI_ENV
from handlers.serving_properties import ServingProperties

NAMES = list(ServingProperties.model_fields)
#: every key spelling the parser knows, plus arbitrary ones
ENV_KEYS = st.one_of(st.sampled_from([f"OPTION_{name.upper()}" for name in NAMES] + list(LMI_ENV) + list(COMPAT_ENV)
                                     + ["SAGEMAKER_BIND_TO_PORT"]),
                     st.text(alphabet=st.characters(whitelist_categories=("Lu", "Nd"), whitelist_characters="_"),
                              min_size=1, max_size=30).map(lambda key: "OPTION_" + key))
FILE_KEYS = st.one_of(st.sampled_from([f"option.{name}" for name in NAMES] + ["engine", "job_queue_size",
                                                                              "option.entryPoint", "minWorkers"]),
                      st.text(min_size=1, max_size=30))
# Values as they arrive: any text (environment values cannot hold NUL), and the typical near-misses.
VALUES = st.one_of(st.text(alphabet=st.characters(blacklist_characters="\x00"), max_size=40),
                   st.sampled_from(["", " ", "0", "-1", "1e309", "nan", "inf", "true", "TRUE", "max", "auto", "fp16",
                                    "99999999999999999999999", "s3://", "/", "..", "\t"]))

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def parse(environ: dict[str, str], properties: str | None = None) -> None:
    with tempfile.TemporaryDirectory() as directory:
        if properties is not None:
            (Path(directory) / "serving.properties").write_text(properties, encoding="utf-8", errors="surrogatepass")
        try:
            configuration = load_configuration(directory, environ)
        except ConfigurationError as error:
            assert str(error).startswith("invalid configuration (") and error.problems
            return
    assert isinstance(configuration, Configuration)
    configuration.resolved()  # what `plan` prints must render too


@FUZZ
@given(st.dictionaries(ENV_KEYS, VALUES, max_size=6))
def test_any_environment_gives_a_configuration_or_a_configuration_error(environ):
    parse(environ)


@FUZZ
@given(st.lists(st.tuples(FILE_KEYS, st.sampled_from(["=", ":", " = ", " "]), VALUES), max_size=6))
def test_any_serving_properties_gives_a_configuration_or_a_configuration_error(lines):
    text = "\n".join(f"{key}{separator}{value}" for key, separator, value in lines)
    parse({}, text)


@FUZZ
@given(st.text(max_size=300))
def test_any_text_as_serving_properties_gives_a_configuration_or_a_configuration_error(text):
    parse({}, text)


def test_a_serving_properties_that_is_not_utf8_names_the_file_and_line(tmp_path):
    """What the fuzzer found: invalid UTF-8 used to end in a UnicodeDecodeError traceback."""
    (tmp_path / "serving.properties").write_bytes(b"option.max_tokens=512\noption.model_id=\xed\xa0\x80\n")
    try:
        load_configuration(tmp_path, {})
    except ConfigurationError as error:
        assert f"{tmp_path / 'serving.properties'}:2" in str(error) and "not UTF-8" in str(error), str(error)
    else:
        raise AssertionError("accepted a file that is not UTF-8")
