"""The response models: every JSON body the server writes is built from these (`lmi`, `openai_response`,
`errors`, and the status routes), and /openapi.json documents the same models (`entrypoint.http.api_schema`).
Stream lines are the exception where they are per token: LMI's token lines (`LmiStreamLine` with a token) and
OpenAI's chunks are written as dicts, a fifth of a model's cost, once per token; their final and error lines,
details, logprobs and usage are built from the models.

Bodies are dumped with `body()`: fields never set are left out (a token's `special_token`, details'
`top_tokens`), fields set to None are written as null (a choice's `logprobs`), in the order declared here.
"""

from __future__ import annotations

from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field



def body(model: BaseModel) -> dict[str, Any]:
    """The JSON object of a response model: the fields that were set, nested models included."""
    return model.model_dump(exclude_unset=True)


def build(model: type[ModelT], /, **values: Any) -> ModelT:
    """A response model holding `values` as they are: the server's own values need no validation on the way
    out (tests/unit/test_openapi.py validates real responses against these models instead)."""
    return model.model_construct(**values)


ModelT = TypeVar("ModelT", bound=BaseModel)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


# ---- LMI ----------------------------------------------------------------------------------------------
class LmiToken(_Strict):
    id: int
    text: str
    log_prob: float | None = Field(description="null where there is none (the first prompt token)")
    special_token: Literal[True] | None = Field(None, description="present (true) only for special tokens")
    error_msg: str | None = Field(None, description="only on a stream's error line")


class LmiSequence(_Strict):
    """One of the other sequences of n / best_of (LMI's BestOfSequence)."""

    finish_reason: Literal["length", "eos_token", "stop_sequence"] | None
    generated_tokens: int
    tokens: list[LmiToken]
    top_tokens: list[list[LmiToken]] | None = None
    prefill: list[LmiToken] | None = None
    generated_text: str


class LmiDetails(_Strict):
    finish_reason: Literal["length", "eos_token", "stop_sequence", "error"] | None
    generated_tokens: int | None
    inputs: str | None
    tokens: list[LmiToken] | None = Field(None, description="not streamed: the tokens came line by line")
    top_tokens: list[list[LmiToken]] | None = Field(None, description="with top_n_tokens")
    prefill: list[LmiToken] | None = Field(None, description="with decoder_input_details")
    best_of_sequences: list[LmiSequence] | None = Field(None, description="with n > 1: the next best sequences")


class LmiResponse(_Strict):
    generated_text: str
    details: LmiDetails | None = Field(None, description="with parameters.details")


class LmiStreamLine(_Strict):
    """One line of a jsonlines stream (an SSE event's data): a token; the last also has generated_text and
    details; a failure after the headers ends the stream with LMI's error line (error, code, type)."""

    token: LmiToken | None = None
    generated_text: str | None = None
    details: LmiDetails | None = None
    error: str | None = None
    code: int | None = None
    type: str | None = None


class LmiError(_Strict):
    """LMI's error body: `error` and `code` as LMI's handlers answer, `type` and `message` as DJL Serving's;
    a generation failure also has generated_text null and details.finish_reason "error"."""

    error: str
    code: int
    type: str
    message: str
    generated_text: None = None
    details: LmiDetails | None = None


class PingOk(_Strict):
    status: Literal["healthy"]


class PingUnavailable(_Strict):
    """/ping while the model loads, after it failed, or with the engine unhealthy: the phase, and LMI's error
    body's fields."""

    status: str
    phase: str
    progress: str
    error: str
    code: int
    type: str
    message: str


class ModelEntry(_Strict):
    modelName: str
    status: Literal["LOADING", "READY", "FAILED"]
    progress: str | None = None
    error: str | None = None
    engine: str | None = None
    maxTotalTokens: int | None = None
    healthy: bool | None = None


class Models(_Strict):
    models: list[ModelEntry]


# ---- OpenAI -----------------------------------------------------------------------------------------------
class Usage(_Strict):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionLogprobs(_Strict):
    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class CompletionChoice(_Strict):
    index: int
    text: str
    logprobs: CompletionLogprobs | None
    finish_reason: Literal["stop", "length"] | None


class Completion(_Strict):
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class TopLogprob(_Strict):
    token: str
    logprob: float
    bytes: list[int]


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(_Strict):
    content: list[ChatTokenLogprob]
    refusal: None


class ChatMessage(_Strict):
    role: Literal["assistant"]
    content: str
    refusal: None


class ChatChoice(_Strict):
    index: int
    message: ChatMessage
    logprobs: ChatLogprobs | None
    finish_reason: Literal["stop", "length"] | None


class ChatCompletion(_Strict):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class OpenAIErrorDetail(_Strict):
    message: str
    type: Literal["invalid_request_error", "server_error"]
    param: str | None
    code: str


class OpenAIError(_Strict):
    error: OpenAIErrorDetail


class ModelCard(_Strict):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    max_model_len: int | None = None


class ModelList(_Strict):
    object: Literal["list"]
    data: list[ModelCard]
