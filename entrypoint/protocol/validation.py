"""Validation shared by the LMI and OpenAI request schemas: the JSON body, strict value types, fields a
client sent that this server does not know, and turning pydantic errors into messages that name the field.

Strict types (the README promises strict validation, and the intent of `"stream": "yes"` or
`"max_new_tokens": true` is ambiguous): booleans must be JSON true/false (`Bool`), and numbers must not be
booleans (`StrictModel`).
Numeric strings ("30") stay accepted where a number is expected, as LMI's vLLM front end (a lax pydantic
model) accepts them.

Unknown fields are accepted and ignored, as LMI and vLLM do (load tools and clients send fields they use
elsewhere, e.g. `use_beam_search`, `adapters`): each name is logged once at debug level and every ignored
field is counted in `lmi_ignored_request_fields_total{api}` (see `entrypoint.http.metrics`).
"""

from __future__ import annotations

import json
import logging
import threading
import types
import typing
from typing import Annotated, Any, Iterable

from pydantic import BaseModel, Field, StrictBool, StringConstraints, ValidationError, ValidationInfo, field_validator

from handlers.engine import InvalidRequest, SamplingParams

logger = logging.getLogger("lmi.http")


#: JSON true or false only (pydantic's lax bool takes "yes", "on", 1)
Bool = StrictBool
#: a non-empty string (a stop sequence)
Text = Annotated[str, StringConstraints(min_length=1)]
#: a token id
TokenId = Annotated[int, Field(ge=0)]


def _base(annotation: Any) -> Any:
    return typing.get_args(annotation)[0] if typing.get_origin(annotation) is Annotated else annotation


def _numeric(annotation: Any) -> tuple[bool, bool]:
    """(a number, a list of numbers) for a field's annotation (int, float, optional or not)."""
    args = typing.get_args(annotation) if typing.get_origin(annotation) in (typing.Union, types.UnionType) \
        else (annotation,)
    number = any(arg in (int, float) for arg in args)
    listed = any(typing.get_origin(arg) is list and _base(typing.get_args(arg)[0]) in (int, float) for arg in args)
    return number, listed


class StrictModel(BaseModel):
    """Refuses JSON booleans where numbers go (pydantic's lax int takes true as 1), keeping plain `int` and
    `float` annotations so the JSON schema states their ranges."""

    @field_validator("*", mode="before")
    @classmethod
    def _no_booleans_for_numbers(cls, value: Any, info: ValidationInfo) -> Any:
        field = cls.model_fields.get(info.field_name or "")
        if field is not None:
            number, listed = _numeric(field.annotation)
            if number and isinstance(value, bool) or listed and isinstance(value, list) \
                    and any(isinstance(item, bool) for item in value):
                raise ValueError("expected a number, got a boolean")
        return value


def stop_sequences(value: Any, limit: int | None = None) -> Any:
    """A `stop` value as both APIs take it: a non-empty string or a list of them (at most `limit`)."""
    if value is None or isinstance(value, str) and value:
        return value
    if not isinstance(value, list) or not all(isinstance(item, str) and item for item in value):
        raise ValueError("expected a non-empty string or a list of non-empty strings")
    if limit is not None and len(value) > limit:
        raise ValueError(f"at most {limit} stop sequences, got {len(value)}")
    return value


# ---- the body -----------------------------------------------------------------------------------------
def load_json_object(body: bytes, example: str = '{"inputs": "..."}') -> dict[str, Any]:
    """The body as a JSON object (every API here takes one), or `InvalidRequest` saying what it is instead.
    Strings holding a lone UTF-16 surrogate (`"\\ud800"`, valid JSON but no Unicode text) are refused here,
    naming where they are: the tokenizer and the UTF-8 response encoder would fail on them later."""
    try:
        data = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        where = f" at line {exc.lineno} column {exc.colno}" if isinstance(exc, json.JSONDecodeError) else ""
        reason = exc.msg if isinstance(exc, json.JSONDecodeError) else "not UTF-8"
        raise InvalidRequest(f"the request body is not valid JSON: {reason}{where}") from None
    if not isinstance(data, dict):
        raise InvalidRequest(f"the request body must be a JSON object like {example}, got {kind_of(data)}")
    _check_text(data, "")
    return data


def _check_text(value: Any, path: str) -> None:
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as exc:
            field = path or "body"
            raise InvalidRequest(f"{field}: the string holds a lone UTF-16 surrogate "
                                 f"({value[exc.start]!r} at character {exc.start}), which is not Unicode text; "
                                 "send UTF-8 text (a surrogate pair, or the character itself)", field) from None
    elif isinstance(value, dict):
        for key, item in value.items():
            _check_text(key, path)
            _check_text(item, f"{path}.{key}" if path else str(key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            _check_text(item, f"{path}[{index}]")


# ---- unknown fields -------------------------------------------------------------------------------------
class IgnoredFields:
    """Logs each ignored field name once (debug) and counts ignored fields per API through `count`."""

    #: names remembered for "once"; clients choose the names, so the set is bounded
    MAX_REMEMBERED = 1024

    def __init__(self) -> None:
        self._seen: set[str] = set()
        self._lock = threading.Lock()

    def note(self, api: str, names: Iterable[str], count: Any = None) -> None:
        names = list(names)
        if not names:
            return
        if count is not None:
            count(api, len(names))
        with self._lock:
            new = [name for name in names if name not in self._seen]
            if len(self._seen) < self.MAX_REMEMBERED:
                self._seen.update(new)
        for name in new:
            logger.debug("ignoring the request field %r (%s API): this server does not use it", name, api)


IGNORED_FIELDS = IgnoredFields()


# ---- error messages -------------------------------------------------------------------------------------
def validation_error(error: ValidationError, prefix: str, model: type[BaseModel],
                     aliases: Iterable[str] = ()) -> InvalidRequest:
    """One `InvalidRequest` for a pydantic error: each bad field with the value sent and what is allowed;
    its `field` is the first bad field."""
    messages: dict[str, str] = {}  # one message per field (a union like `inputs` reports each member)
    # Of a union's member errors, "empty" says the most (`inputs = []` is a list, only too short).
    details = sorted(error.errors(), key=lambda detail: detail.get("type") not in ("too_short", "string_too_short"))
    for detail in details:
        loc = [str(part) for part in detail["loc"]]
        name = loc[0] if loc else "?"
        shown = prefix + name if loc else prefix.rstrip(".")
        messages.setdefault(shown, _describe(shown, name, detail, model, aliases))
    return InvalidRequest("; ".join(messages.values()), next(iter(messages), None))


def _describe(shown: str, name: str, detail: dict[str, Any], model: type[BaseModel], aliases: Iterable[str]) -> str:
    kind = detail.get("type", "")
    value = detail.get("input")
    info = model.model_fields.get(name)
    sent = f"{shown} = {show(value)}"
    if kind == "extra_forbidden":
        allowed = ", ".join(sorted(set(model.model_fields) | set(aliases)))
        return f"{shown}: unknown {'parameter' if model is SamplingParams else 'field'}; allowed are {allowed}"
    if kind == "missing":
        return f"{shown}: required field is missing"
    if kind in ("string_too_short", "too_short"):
        return f"{sent}: must not be an empty {'string' if kind == 'string_too_short' else 'list'}"
    if name == "inputs":
        return f"{sent}: expected a string or a list of strings"
    if kind in ("greater_than", "greater_than_equal", "less_than", "less_than_equal"):
        why = f" ({info.description})" if info is not None and info.description else ""
        return f"{sent} is out of range: must be {_bounds(info)}{why}"
    if kind.startswith("int_"):
        return f"{sent}: expected an integer{_in(info)}"
    if kind.startswith("float_"):
        return f"{sent}: expected a number{_in(info)}"
    if kind.startswith("bool_"):
        return f"{sent}: expected true or false"
    if kind in ("string_type", "str_type"):
        return f"{sent}: expected a string"
    if kind in ("list_type", "tuple_type"):
        return f"{sent}: expected a list"
    if kind == "dict_type":
        return f"{sent}: expected a JSON object"
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


def show(value: Any) -> str:
    text = json.dumps(value) if isinstance(value, (str, int, float, bool, list, dict, type(None))) else repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def kind_of(value: Any) -> str:
    return {list: "an array", str: "a string", bool: "a boolean", type(None): "null"}.get(type(value), "a number")
