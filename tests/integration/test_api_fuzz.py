"""API fuzzing from the server's own OpenAPI document (schemathesis): every operation in /openapi.json is
called with generated valid and invalid inputs against the real server on the embedded model. No response
may be a 5xx, none may hang, and every response must match the schema the document declares for it.

Bounded so CI stays fast: a few examples per operation, generation lengths clamped to a few tokens (the
server's limits would allow minutes of CPU generation per request), and a timeout per call."""

from __future__ import annotations

import os

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import response_schema_conformance

pytestmark = pytest.mark.slow

#: request fields that multiply the CPU time of one request; clamped to COST_CAP when fuzzed higher
COSTLY_FIELDS = ("max_new_tokens", "max_tokens", "max_completion_tokens", "n", "best_of", "top_n_tokens",
                 "top_logprobs")
COST_CAP = 4
CALL_TIMEOUT_S = 120  # "no hang": far more than any bounded request takes on a loaded 2-core machine
#: per operation and mode; LMI_FUZZ_EXAMPLES raises it for a longer hunt with fresh random examples each
#: run (CI keeps 10, the same ones every run: a red CI must be reproducible, and hunting is a separate job)
EXAMPLES = int(os.environ.get("LMI_FUZZ_EXAMPLES", "10"))
HUNTING = "LMI_FUZZ_EXAMPLES" in os.environ


def bounded(value):
    """`value` with every costly numeric field clamped (recursively: LMI nests them under "parameters")."""
    if isinstance(value, dict):
        return {key: (min(item, COST_CAP) if key in COSTLY_FIELDS and isinstance(item, (int, float))
                      and not isinstance(item, bool) else bounded(item)) for key, item in value.items()}
    if isinstance(value, list):
        return [bounded(item) for item in value[:4]]  # LMI list inputs: a few prompts are enough
    return value


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_no_operation_answers_5xx_hangs_or_breaks_its_schema(embedded_server, mode):
    # Hypothesis strategies from schemathesis, driven here rather than through schemathesis' pytest plugin
    # (its lazy fixture loader does not run under pytest 9).
    schema = schemathesis.openapi.from_url(embedded_server["url"] + "/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {"/invocations", "/v1/completions", "/v1/chat/completions", "/ping"} <= {op.path for op in operations}
    for operation in operations:
        @given(case=operation.as_strategy(generation_mode=mode))
        @settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), database=None,
                  derandomize=not HUNTING)
        def call(case):
            if isinstance(case.body, (dict, list)):
                case.body = bounded(case.body)
            if isinstance(case.body, dict) and ("messages" in case.body or "prompt" in case.body) \
                    and not {"max_tokens", "max_completion_tokens"} & case.body.keys():
                case.body["max_tokens"] = COST_CAP  # OpenAI's default is the rest of the context: minutes here
            if isinstance(case.body, dict) and "inputs" in case.body:
                parameters = case.body.setdefault("parameters", {})
                if isinstance(parameters, dict):
                    parameters.setdefault("max_new_tokens", COST_CAP)  # LMI's default is 30 (per sequence)
            case.call_and_validate(checks=[not_a_server_error, response_schema_conformance], timeout=CALL_TIMEOUT_S)

        try:
            call()
        except Unsatisfiable:
            # Negative mode on an operation with nothing declared to violate (no parameters, no body schema)
            assert mode is GenerationMode.NEGATIVE, operation.label
