"""`Input` / `Output` / `PairList` as DJL Serving's Python engine (`djl_python.inputs`, `.outputs`,
`.pair_list`) defines them, small enough for `entrypoint.djl_handler.handle()` and its tests.

How DJL Serving talks to a Python handler (read from deepjavalibrary/djl-serving, `PyProcess`,
`PyPredictor`, `RollingBatch`, `python_sync_engine.py`, `service_loader.py`):

* The first call initializes: its `Input` has no content, and its properties are serving.properties'
  `option.*` keys without the prefix (`model_id`, `entryPoint`, `tensor_parallel_degree`, ...) plus keys DJL
  adds on every call (`model_dir`, `device_id`, ...). `handle()` returns None for an empty input.
* One request: properties are the request's (HTTP headers such as `Content-Type`), content is the body
  under the key `data`.
* A batch of N requests is ONE `Input` with the property `batch_size=N`; request i's properties and content
  keys get the prefix `batch_NNN.` (i zero-padded to three digits, so `batch_000.data`,
  `batch_002.Content-Type`); other, unprefixed properties may sit beside them. `get_batches()` splits it.
* A batch answer is ONE `Output` with exactly one content entry per request, keyed `batch_<i>.<key>`
  (`Output.add(value, key="data", batch_index=i)`). DJL's dynamic-batch predictor gives request i that
  entry and the whole `Output`'s code; a code >= 300 fails every request of the batch, so per-request
  errors travel in the entries with the batch code 200. Per-request properties are written
  `batch_<i>_<name>` (`batch_0_Content-Type`), as DJL's rolling batch handlers wrote them and its rolling
  batch loop reads them. `split_batch_output` does what DJL's Java side does with such an `Output`.

Deviations from djl_python, all additive: `Input(properties, content)` and `Output.get_code()`,
`get_message()`, `get_content()`, `get_as_bytes/string/json()` for reading back; `encode_batch()` builds a
batch the way DJL's Java side does; `get_batches()` also accepts indices above 999 and `_` after the index
(the layout djl_python's own test helpers use); JSON is written compactly (djl_python indents by 2), so a
response body is byte-for-byte what /invocations returns. Not implemented: numpy/npz/image/CSV payloads,
streaming (`add_stream_content`), the socket wire format (`read`/`send`), `Output.binary_encode` used by
DJL's token-by-token rolling batch protocol.
"""

from __future__ import annotations

import json
import re
from typing import Any, Iterable

_BATCH_KEY = re.compile(r"batch_(\d+)[._](.*)", re.DOTALL)


class PairList:
    """An ordered list of (key, value) pairs with repeatable keys, as djl_python's PairList."""

    def __init__(self, keys: list[Any] | None = None, values: list[Any] | None = None):
        keys, values = list(keys or []), list(values or [])
        if len(keys) != len(values):
            raise ValueError("key value size mismatch.")
        self.keys, self.values = keys, values

    def add(self, key: Any = None, value: Any = None) -> None:
        if value is not None:  # djl_python ignores None values too
            self.keys.append(key)
            self.values.append(value)

    def size(self) -> int:
        return len(self.keys)

    def is_empty(self) -> bool:
        return not self.keys

    def get(self, key: Any) -> Any:
        return self.values[self.keys.index(key)] if key in self.keys else None

    def key_at(self, index: int) -> Any:
        return self.keys[index]

    def value_at(self, index: int) -> Any:
        return self.values[index]

    def get_keys(self) -> list[Any]:
        return self.keys

    def get_values(self) -> list[Any]:
        return self.values


class _ContentAccess:
    """djl_python's content accessors, shared by Input and Output (both hold a `PairList` in `content`)."""

    content: PairList
    _noun = "content"  # "the input" / "the output" in the error for missing content

    def get_as_bytes(self, key: str | None = None) -> bytes | bytearray | None:
        """djl_python's lookup: the value under `key` (KeyError if absent), else under "data", else the first."""
        if self.content.is_empty():
            return None
        if key:
            value = self.content.get(key)
            if value is None:
                raise KeyError(f"requested data for key:{key} is not found!")
            return value
        value = self.content.get("data")
        return self.content.value_at(0) if value is None else value

    def get_as_string(self, key: str | None = None) -> str:
        data = self.get_as_bytes(key)
        if data is None:
            raise ValueError(f"the {self._noun} has no content")
        return bytes(data).decode("utf-8")

    def get_as_json(self, key: str | None = None) -> Any:
        return json.loads(self.get_as_string(key))


class Input(_ContentAccess):
    """One request (or a batch of them, see the module docstring) as DJL hands it to `handle()`."""

    _noun = "input"

    def __init__(self, properties: dict[str, Any] | None = None, content: PairList | None = None):
        self.function_name: str | None = None
        self.properties: dict[str, Any] = dict(properties or {})
        self.content = content if content is not None else PairList()

    def __str__(self) -> str:
        lines = [f"properties: {self.properties}"]
        lines += [f"{key}: {bytes(value)[:200]!r}" for key, value in zip(self.content.keys, self.content.values)]
        return "\n".join(lines)

    # ---- properties and content -----------------------------------------------------------------------
    def get_function_name(self) -> str | None:
        return self.function_name

    def get_properties(self) -> dict[str, Any]:
        return self.properties

    def get_property(self, key: str) -> Any:
        """The property `key`, case-insensitively (HTTP header names), or None."""
        lowered = key.lower()
        return next((value for name, value in self.properties.items() if name.lower() == lowered), None)

    def get_content(self) -> PairList:
        return self.content

    def contains_key(self, key: str) -> bool:
        return self.content.get(key) is not None

    def is_empty(self) -> bool:
        return self.content.is_empty()


    # ---- batches ------------------------------------------------------------------------------------
    def is_batch(self) -> bool:
        return "batch_size" in self.properties

    def get_batch_size(self) -> int:
        return int(self.properties.get("batch_size", "1"))

    def get_batches(self) -> list[Input]:
        """The requests of a batch (`[self]` when this is not one), each with its own properties and content."""
        if not self.is_batch():
            return [self]
        batch = [Input() for _ in range(self.get_batch_size())]
        for key, value in self.properties.items():
            match = _BATCH_KEY.fullmatch(key) if key != "batch_size" else None
            if match:
                batch[int(match.group(1))].properties[match.group(2)] = value
        for key, value in zip(self.content.keys, self.content.values):
            match = _BATCH_KEY.fullmatch(str(key))
            if match is None:
                raise ValueError(f"content key {key!r} of a batch input has no batch_NNN. prefix")
            batch[int(match.group(1))].content.add(match.group(2), value)
        return batch


def encode_batch(requests: Iterable[Input], properties: dict[str, Any] | None = None) -> Input:
    """One batched `Input` from several requests, laid out as DJL's Java side sends it (`PyPredictor`):
    `batch_size`, then each request's properties and content under `batch_NNN.`; `properties` are extra
    unprefixed properties."""
    batch = Input(properties)
    requests = list(requests)
    for index, request in enumerate(requests):
        prefix = f"batch_{index:03d}."
        for key, value in request.properties.items():
            batch.properties[prefix + key] = value
        for key, value in zip(request.content.keys, request.content.values):
            batch.content.add(prefix + ("data" if key is None else key), value)
    batch.properties["batch_size"] = str(len(requests))
    return batch


def encode_json(value: Any) -> bytes:
    """JSON as the HTTP server writes it (Starlette's JSONResponse): UTF-8, compact, no NaN."""
    return json.dumps(value, ensure_ascii=False, allow_nan=False, indent=None, separators=(",", ":")).encode("utf-8")


class Output(_ContentAccess):
    """What `handle()` returns: a status code and message, properties (response headers) and content."""

    _noun = "output"

    def __init__(self, code: int = 200, message: str = "OK"):
        self.code = code
        self.message = message
        self.properties: dict[str, str] = {}
        self.content = PairList()

    def __str__(self) -> str:
        content = {str(key): f"{len(value)} bytes" for key, value in zip(self.content.keys, self.content.values)}
        return json.dumps({"code": self.code, "message": self.message, "properties": self.properties,
                           "content": content}, indent=2)

    def set_code(self, code: int) -> Output:
        self.code = code
        return self

    def set_message(self, message: str) -> Output:
        self.message = message
        return self

    def error(self, error: str, code: int = 424, message: str = "invoke handler failure",
              key: str | None = None, batch_index: int | None = None) -> Output:
        """djl_python's error: set code and message, and add `{"code", "message", "error"}` as JSON.
        (`key` / `batch_index` are additions, passed on to `add`.)"""
        self.code = code
        self.message = message
        self.add_property("content-type", "application/json")
        return self.add_as_json({"code": code, "message": message, "error": error}, key=key, batch_index=batch_index)

    def add_property(self, key: str, val: str) -> Output:
        self.properties[key] = val
        return self

    def add(self, value: Any, key: str | None = None, batch_index: int | None = None) -> Output:
        """Add str (UTF-8), bytes, or anything else as JSON; with `batch_index` the key is `batch_<i>.<key>`."""
        if key is not None and not isinstance(key, str):
            key = str(key)
        if batch_index is not None:
            key = f"batch_{batch_index}.{'' if key is None else key}"
        if isinstance(value, str):
            data = bytearray(value.encode("utf-8"))
        elif isinstance(value, (bytes, bytearray)):
            data = bytearray(value)
        else:
            data = bytearray(encode_json(value))
        self.content.add(key, data)
        return self

    def add_as_json(self, val: Any, key: str | None = None, batch_index: int | None = None) -> Output:
        return self.add(encode_json(val), key=key, batch_index=batch_index)

    # ---- reading back (djl_python has get_properties / get_property; the rest are additions) -----------
    def get_code(self) -> int:
        return self.code

    def get_message(self) -> str:
        return self.message

    def get_properties(self) -> dict[str, str]:
        return self.properties

    def get_property(self, key: str) -> str | None:
        return self.properties.get(key)

    def get_content(self) -> PairList:
        return self.content



def split_batch_output(output: Output, batch_size: int) -> list[Output]:
    """One `Output` per request of a batch answer, as DJL's Java side splits it: the batch code >= 300 fails
    every request; else request i gets the content under `batch_<i>.<key>` (as `<key>`), the batch's
    unprefixed properties, and its own `batch_<i>_<name>` properties as `<name>` (a `code` property, which
    `entrypoint.djl_handler` writes, becomes the request's status code)."""
    if output.code >= 300:
        return [output] * batch_size
    if output.content.size() != batch_size:
        raise ValueError(f"Batch output size mismatch, expected: {batch_size}, actual: {output.content.size()}")
    outputs = [Output(output.code, output.message) for _ in range(batch_size)]
    shared = {key: value for key, value in output.properties.items() if not _is_item_property(key)}
    for out in outputs:
        out.properties.update(shared)
    for key, value in output.properties.items():
        match = re.fullmatch(r"batch_(\d+)_(.*)", key, re.DOTALL)
        if match:
            outputs[int(match.group(1))].properties[match.group(2)] = value
    for key, value in zip(output.content.keys, output.content.values):
        match = re.fullmatch(r"batch_(\d+)\.(.*)", str(key), re.DOTALL)
        if match is None:
            raise ValueError(f"Unexpected batch output key: {key}")
        outputs[int(match.group(1))].content.add(match.group(2), value)
    for out in outputs:
        code = out.properties.get("code")
        if code is not None:
            out.code = int(code)
            out.message = out.properties.get("message", out.message)
    return outputs


def _is_item_property(key: str) -> bool:
    return re.fullmatch(r"batch_\d+_.*", key, re.DOTALL) is not None
