"""LMI's request schema and response bodies.

Request: `{"inputs": str | [str], "parameters": {...}, "stream": bool}`. `parameters` become a
`SamplingParams` (the engine's one definition of ranges), with `stop` accepted as LMI's alias of
`stop_sequences`. Every validation problem becomes `InvalidRequest` whose message names the field, the
value sent and what is allowed.

Response: `{"generated_text": str}` for a string input and a list of those for a list input, as LMI
returned them; `details: true` adds `{"finish_reason", "generated_tokens", "tokens": [{"id", "text",
"log_prob", "special"}]}`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

from handlers.engine import FinishReason, InvalidRequest, RequestOutput, SamplingParams, Token

#: LMI parameter spellings that mean a SamplingParams field
PARAMETER_ALIASES = {"stop": "stop_sequences"}


class LmiRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    inputs: str | list[str]
    parameters: dict[str, Any] | None = None  # null and {} both mean the defaults
    stream: bool | None = None

    @property
    def is_batch(self) -> bool:
        return isinstance(self.inputs, list)

    @property
    def prompts(self) -> list[str]:
        return list(self.inputs) if isinstance(self.inputs, list) else [self.inputs]


def parse_request(body: bytes) -> tuple[LmiRequest, SamplingParams]:
    """Parse and validate a request body; raises `InvalidRequest` naming what is wrong."""
    return parse_lmi(load_json_object(body))


def load_json_object(body: bytes, example: str = '{"inputs": "..."}') -> dict[str, Any]:
    """The body as a JSON object (every API here takes one), or `InvalidRequest` saying what it is instead."""
    try:
        data = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        where = f" at line {exc.lineno} column {exc.colno}" if isinstance(exc, json.JSONDecodeError) else ""
        reason = exc.msg if isinstance(exc, json.JSONDecodeError) else "not UTF-8"
        raise InvalidRequest(f"the request body is not valid JSON: {reason}{where}") from None
    if not isinstance(data, dict):
        raise InvalidRequest(f"the request body must be a JSON object like {example}, got {_kind(data)}")
    return data


def parse_lmi(data: dict[str, Any]) -> tuple[LmiRequest, SamplingParams]:
    try:
        request = LmiRequest.model_validate(data)
    except ValidationError as exc:
        raise validation_error(exc, "", LmiRequest) from None
    if request.is_batch and not request.inputs:
        raise InvalidRequest("inputs is an empty list; send a string or a list of strings", "inputs")
    return request, sampling_params(request.parameters or {})


def sampling_params(parameters: dict[str, Any]) -> SamplingParams:
    values: dict[str, Any] = {}
    for key, value in parameters.items():
        name = PARAMETER_ALIASES.get(key, key)
        if name in values:
            raise InvalidRequest(f"parameters.{key} and parameters.{name} mean the same; send only one",
                                 f"parameters.{key}")
        values[name] = value
    try:
        return SamplingParams(**values)
    except ValidationError as exc:
        raise validation_error(exc, "parameters.", SamplingParams) from None


def validation_error(error: ValidationError, prefix: str, model: type[BaseModel]) -> InvalidRequest:
    """One `InvalidRequest` for a pydantic error: each bad field with the value sent and what is allowed;
    its `field` is the first bad field."""
    messages: dict[str, str] = {}  # one message per field (a union like `inputs` reports each member)
    for detail in error.errors():
        loc = [str(part) for part in detail["loc"]]
        name = loc[0] if loc else "?"
        shown = prefix + name if loc else prefix.rstrip(".")
        messages.setdefault(shown, _describe(shown, name, detail, model))
    return InvalidRequest("; ".join(messages.values()), next(iter(messages), None))


def _describe(shown: str, name: str, detail: dict[str, Any], model: type[BaseModel]) -> str:
    kind = detail.get("type", "")
    value = detail.get("input")
    info = model.model_fields.get(name)
    sent = f"{shown} = {_show(value)}"
    if kind == "extra_forbidden":
        names = set(model.model_fields) | (set(PARAMETER_ALIASES) if model is SamplingParams else set())
        allowed = ", ".join(sorted(names))
        return f"{shown}: unknown {'parameter' if model is SamplingParams else 'field'}; allowed are {allowed}"
    if kind == "missing":
        return f"{shown}: required field is missing"
    if kind in ("greater_than", "greater_than_equal", "less_than", "less_than_equal"):
        return f"{sent} is out of range: must be {_bounds(info)}"
    if kind.startswith("int_"):
        return f"{sent}: expected an integer{_in(info)}"
    if kind.startswith("float_"):
        return f"{sent}: expected a number{_in(info)}"
    if kind.startswith("bool_"):
        return f"{sent}: expected true or false"
    if kind == "dict_type":
        return f"{sent}: expected a JSON object"
    if name == "inputs":
        return f"{sent}: expected a string or a list of strings"
    if kind == "value_error":
        return f"{sent}: {(detail.get('ctx') or {}).get('error', detail['msg'])}"
    return f"{sent}: {detail['msg']}"


def _bounds(info: Any) -> str:
    parts = []
    for meta in getattr(info, "metadata", ()):
        for attr, symbol in (("gt", ">"), ("ge", ">="), ("lt", "<"), ("le", "<=")):
            bound = getattr(meta, attr, None)
            if bound is not None:
                parts.append(f"{symbol} {bound}")
    return " and ".join(parts) if parts else "within the allowed range"


def _in(info: Any) -> str:
    bounds = _bounds(info)
    return "" if bounds == "within the allowed range" else f" {bounds}"


def _show(value: Any) -> str:
    text = json.dumps(value) if isinstance(value, (str, int, float, bool, list, dict, type(None))) else repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _kind(value: Any) -> str:
    return {list: "an array", str: "a string", bool: "a boolean", type(None): "null"}.get(type(value), "a number")


# ---- responses --------------------------------------------------------------------------------------
def token_dict(token: Token, text: str | None = None) -> dict[str, Any]:
    data: dict[str, Any] = {"id": token.id, "text": token.text if text is None else text,
                            "log_prob": token.log_prob, "special": token.special}
    if token.top_tokens:
        data["top_tokens"] = [{"id": t.id, "text": t.text, "log_prob": t.log_prob} for t in token.top_tokens]
    return data


@dataclass
class Accumulator:
    """Collects one request's outputs into its final text, tokens and finish."""

    prompt: str
    params: SamplingParams
    text: str = ""
    tokens: list[Token] = field(default_factory=list)
    finish_reason: FinishReason | None = None
    prompt_tokens: int = 0
    generated_tokens: int = 0
    final: RequestOutput | None = None

    def add(self, output: RequestOutput) -> None:
        self.text += output.text
        self.tokens.extend(output.tokens)
        self.prompt_tokens = output.prompt_tokens or self.prompt_tokens
        self.generated_tokens = max(self.generated_tokens, output.generated_tokens, len(self.tokens))
        if output.finished:
            self.final = output
            self.finish_reason = output.finish_reason

    @property
    def generated_text(self) -> str:
        return self.prompt + self.text if self.params.return_full_text else self.text

    def details(self, with_tokens: bool = True) -> dict[str, Any]:
        details: dict[str, Any] = {
            "finish_reason": self.finish_reason.value if self.finish_reason else None,
            "generated_tokens": self.generated_tokens,
        }
        if with_tokens:
            details["tokens"] = [token_dict(token) for token in self.tokens]
        return details

    def response(self) -> dict[str, Any]:
        body: dict[str, Any] = {"generated_text": self.generated_text}
        if self.params.details:
            body["details"] = self.details()
        return body


def build_response(results: list[Accumulator], batch: bool) -> Any:
    """`{"generated_text": ...}` for a string input, `[{...}, ...]` for a list input."""
    bodies = [result.response() for result in results]
    return bodies if batch else bodies[0]
