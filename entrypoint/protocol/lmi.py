"""LMI's request schema and response bodies (djl-serving's lmi_input_output_schema.md and
djl_python/output_formatter.py, request_io.py; LMI 0.32+ semantics).

Request: `{"inputs": str | [str], "parameters": {...}, "stream": bool}`. `parameters` are LMI's
GenerationParameters (`LmiParameters`), turned into the engine's `SamplingParams`:
  max_new_tokens      default 30, LMI's (0 with decoder_input_details scores the prompt only)
  do_sample           unset: sampling is inferred from the other sampling parameters, as LMI documents from
                      0.32 on (temperature > 0, top_p < 1 or top_k > 0 turn it on); false: greedy whatever
                      else is set; temperatures below `MIN_SAMPLING_TEMPERATURE` decode greedily
  top_k               -1 (vLLM's "disabled") and 0 both disable top-k
  stop / stop_sequences (one of them), stop_token_ids, ignore_eos / ignore_eos_token (one of them)
  details, decoder_input_details (details.prefill), top_n_tokens (or vLLM's name logprobs),
  return_full_text, truncate (keep the last N prompt tokens, TGI's), seed, the penalties
  n, best_of            best_of (>= n) sequences are generated per input (seed + i with a seed) and ranked by
                      mean log-probability per token; generated_text is the best, and with more than one
                      returned (n, which defaults to best_of as in LMI), details.best_of_sequences holds the
                      next n - 1 (LMI's vLLM schema); not streamed
  num_beams             1 accepted; beam search is not served (400 above 1)
  adapters (top level)   accepted when empty; LoRA adapters are not served (400)
Unknown fields, top level or in parameters, are accepted and ignored (`validation.IGNORED_FIELDS`); wrong
types and out-of-range values of known ones are 400s naming the field, the value and what is allowed.

Response: `{"generated_text": str}` for a string input and a list of those for a list input; `details:
true` adds `{"finish_reason", "generated_tokens", "inputs", "tokens": [{"id", "text", "log_prob"}],
"prefill": [...] (decoder_input_details), "top_tokens": [[...]] (top_n_tokens)}`. A token carries
`"special_token": true` only when it is special (LMI's `Token.as_dict`). Joining the tokens' texts gives
generated_text (without return_full_text's prompt): text the output leaves out (a stop sequence) is cut
from the tokens too (`TokenAligner`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from entrypoint.protocol.schema import LmiDetails, LmiResponse, LmiSequence, LmiToken, body, build
from entrypoint.protocol.validation import (IGNORED_FIELDS, Bool, StrictModel, Text, TokenId, stop_sequences,
                                            validation_error)
from handlers.engine import (
    OPENAI_PENALTY_RANGE,
    REPETITION_PENALTY_RANGE,
    SEED_RANGE,
    TEMPERATURE_RANGE,
    TOP_N_TOKENS_RANGE,
    TOP_P_RANGE,
    FinishReason,
    InvalidRequest,
    RequestOutput,
    SamplingParams,
    Token,
)

#: LMI's default max_new_tokens (GenerationParameters in lmi_input_output_schema.md)
LMI_DEFAULT_MAX_NEW_TOKENS = 30
#: most sequences per input (n, best_of), OpenAI's bound for n
MAX_SEQUENCES = 128
#: parameters that mean the same thing: (LMI/vLLM name, the name used here)
SYNONYMS = (("stop", "stop_sequences"), ("ignore_eos_token", "ignore_eos"), ("logprobs", "top_n_tokens"))


class LmiRequest(BaseModel):
    model_config = ConfigDict(extra="allow")  # unknown top-level fields are ignored

    inputs: Text | Annotated[list[Text], Field(min_length=1)]  # an empty prompt has nothing to continue
    parameters: dict[str, Any] | None = None  # null and {} both mean the defaults
    stream: Bool | None = None
    adapters: Any = None

    @property
    def is_batch(self) -> bool:
        """`inputs` is a list: the response is a list then, even of one."""
        return isinstance(self.inputs, list)

    @property
    def prompts(self) -> list[str]:
        return list(self.inputs) if isinstance(self.inputs, list) else [self.inputs]


class LmiParameters(StrictModel):
    """LMI's GenerationParameters as this server takes them (see the module docstring)."""

    # Unknown parameters are ignored; the document says that synonyms exclude each other.
    model_config = ConfigDict(extra="allow", json_schema_extra={
        "not": {"anyOf": [{"required": [lmi_name, name]} for lmi_name, name in SYNONYMS]}})

    max_new_tokens: int = Field(LMI_DEFAULT_MAX_NEW_TOKENS, ge=0)
    do_sample: Bool | None = None
    temperature: float | None = Field(None, **TEMPERATURE_RANGE)
    top_k: int | None = Field(None, ge=-1)
    top_p: float | None = Field(None, **TOP_P_RANGE)
    seed: int | None = Field(None, **SEED_RANGE)
    repetition_penalty: float | None = Field(None, **REPETITION_PENALTY_RANGE)
    presence_penalty: float | None = Field(None, **OPENAI_PENALTY_RANGE)
    frequency_penalty: float | None = Field(None, **OPENAI_PENALTY_RANGE)
    stop_sequences: Text | list[Text] | None = None
    stop: Text | list[Text] | None = None
    stop_token_ids: list[TokenId] | None = None
    ignore_eos: Bool | None = None
    ignore_eos_token: Bool | None = None
    details: Bool | None = None
    decoder_input_details: Bool | None = None
    return_full_text: Bool | None = None
    top_n_tokens: int | None = Field(None, **TOP_N_TOKENS_RANGE)
    logprobs: int | None = Field(None, **TOP_N_TOKENS_RANGE)  # LMI's name of top_n_tokens
    truncate: int | None = Field(None, ge=1)
    n: int | None = Field(None, ge=1, le=MAX_SEQUENCES)
    best_of: int | None = Field(None, ge=1, le=MAX_SEQUENCES)
    num_beams: int | None = Field(None, ge=1, le=1, description="beam search is not served")

    @field_validator("stop_sequences", "stop", mode="before")
    @classmethod
    def _stops(cls, value: Any) -> Any:
        return stop_sequences(value)

    def sampling(self) -> bool:
        """Whether to sample: do_sample when given, else inferred from the sampling parameters (LMI 0.32+)."""
        if self.do_sample is not None:
            return self.do_sample
        return bool((self.temperature or 0.0) > 0.0 or (self.top_p is not None and self.top_p < 1.0)
                    or (self.top_k or 0) > 0)

    def sequences(self) -> tuple[int, int]:
        """(returned, generated) per input: n defaults to best_of, as LMI's vLLM handler has it."""
        returned = self.n or self.best_of or 1
        return returned, self.best_of or returned

    def sampling_params(self) -> SamplingParams:
        values = {key: value for key, value in self.model_dump(exclude_none=True).items() if key in type(self).model_fields}
        for lmi_name, name in SYNONYMS:
            if lmi_name in values and name in values:
                raise InvalidRequest(f"parameters.{lmi_name} and parameters.{name} mean the same; send only one",
                                     f"parameters.{lmi_name}")
            if lmi_name in values:
                values[name] = values.pop(lmi_name)
        values.pop("num_beams", None)  # 1 (the schema allows nothing else)
        returned, generated = self.sequences()
        if generated < returned:
            raise InvalidRequest(f"parameters.best_of = {self.best_of} must be at least parameters.n = {self.n}: "
                                 "best_of sequences are generated and the n best returned", "parameters.best_of")
        for name in ("truncate", "decoder_input_details", "do_sample", "n", "best_of"):
            values.pop(name, None)
        values["do_sample"] = self.sampling()
        values["top_k"] = max(values.get("top_k", 0), 0)
        values["prompt_logprobs"] = bool(self.decoder_input_details and self.details)  # prefill is in details
        try:
            return SamplingParams(**values)
        except ValidationError as exc:
            raise validation_error(exc, "parameters.", SamplingParams) from None


def parse_lmi(data: dict[str, Any], count: Any = None) -> tuple[LmiRequest, LmiParameters, SamplingParams]:
    """The request, its parameters and their engine parameters; `count(api, n)` is told how many unknown fields
    were ignored. Raises `InvalidRequest` naming what is wrong."""
    try:
        request = LmiRequest.model_validate(data)
    except ValidationError as exc:
        raise validation_error(exc, "", LmiRequest) from None
    if isinstance(request.inputs, list) and not request.inputs:
        raise InvalidRequest("inputs is an empty list; send a string or a list of strings", "inputs")
    if request.adapters not in (None, [], ""):
        raise InvalidRequest("adapters: LoRA adapters are not served by this server; leave adapters out", "adapters")
    try:
        parameters = LmiParameters.model_validate(request.parameters or {})
    except ValidationError as exc:
        raise validation_error(exc, "parameters.", LmiParameters, ()) from None
    ignored = [*(request.model_extra or {}), *(f"parameters.{name}" for name in parameters.model_extra or {})]
    IGNORED_FIELDS.note("lmi", ignored, count)
    return request, parameters, parameters.sampling_params()


# ---- responses --------------------------------------------------------------------------------------
def log_prob(value: float) -> float | None:
    """JSON has no NaN or infinity: the first prompt token's nan (no context) and -inf become null."""
    return value if math.isfinite(value) else None


def token_dict(token: Token, text: str | None = None) -> dict[str, Any]:
    """LMI's Token.as_dict: id, text, log_prob, and special_token only when true (an `LmiToken`; stream lines
    write it as a dict, which costs a fifth of building the model, once per token)."""
    data: dict[str, Any] = {"id": token.id, "text": token.text if text is None else text,
                            "log_prob": log_prob(token.log_prob)}
    if token.special:
        data["special_token"] = True
    return data


def lmi_token(token: Token) -> LmiToken:
    return build(LmiToken, **token_dict(token))


class TokenAligner:
    """Lines tokens up with the text the client gets, so that joining the tokens' texts gives that text.

    The engine holds text back (a possible stop sequence, an incomplete UTF-8 character) and leaves a stop
    sequence out of the output entirely, while every generated token is reported with its own text. A token
    is released once the visible text covers it; when the request finishes, a token that reaches past the
    visible end is cut at it, and tokens wholly past it (the stop sequence's) are dropped, except special
    tokens (an end-of-sequence token has no text and stays)."""

    def __init__(self) -> None:
        self._pending: list[Token] = []
        self._uncovered = 0  # visible characters not yet attributed to a released token

    def push(self, tokens: tuple[Token, ...] | list[Token], text: str, finished: bool) -> list[Token]:
        self._pending.extend(tokens)
        self._uncovered += len(text)
        released = []
        while self._pending and len(self._pending[0].text) <= self._uncovered:
            token = self._pending.pop(0)
            self._uncovered -= len(token.text)
            released.append(token)
        if finished:
            for token in self._pending:
                if token.special or self._uncovered > 0:
                    cut = token.text[:self._uncovered] if not token.special else token.text
                    self._uncovered = max(0, self._uncovered - len(cut))
                    released.append(Token(token.id, cut, token.log_prob, token.special, token.top_tokens))
            self._pending = []
        return released


@dataclass
class Accumulator:
    """Collects one request's outputs into its final text, tokens and finish."""

    prompt: str
    params: SamplingParams
    text: str = ""
    tokens: list[Token] = field(default_factory=list)  # aligned with `text` (see TokenAligner)
    raw_tokens: int = 0  # every token the engine reported
    prompt_details: tuple[Token, ...] = ()
    log_prob_sum: float = 0.0  # over every generated token
    finish_reason: FinishReason | None = None
    prompt_tokens: int = 0
    generated_tokens: int = 0
    final: RequestOutput | None = None
    aligner: TokenAligner = field(default_factory=TokenAligner)

    def add(self, output: RequestOutput) -> list[Token]:
        """Take one output; returns the tokens it released (aligned with the visible text)."""
        self.text += output.text
        self.raw_tokens += len(output.tokens)
        self.log_prob_sum += sum(token.log_prob for token in output.tokens if math.isfinite(token.log_prob))
        if output.prompt_token_details:
            self.prompt_details = output.prompt_token_details
        released = self.aligner.push(output.tokens, output.text, output.finished)
        self.tokens.extend(released)
        self.prompt_tokens = output.prompt_tokens or self.prompt_tokens
        self.generated_tokens = max(self.generated_tokens, output.generated_tokens, self.raw_tokens)
        if output.finished:
            self.final = output
            self.finish_reason = output.finish_reason
        return released

    @property
    def mean_log_prob(self) -> float:
        """Mean log-probability per generated token, how best_of ranks sequences (OpenAI's "highest log
        probability per token")."""
        return self.log_prob_sum / self.raw_tokens if self.raw_tokens else 0.0

    @property
    def generated_text(self) -> str:
        return self.prompt + self.text if self.params.return_full_text else self.text

    def details(self, with_tokens: bool = True, best_of: list[LmiSequence] | None = None) -> LmiDetails:
        values: dict[str, Any] = {
            "finish_reason": self.finish_reason.value if self.finish_reason else None,
            "generated_tokens": self.generated_tokens,
            "inputs": self.prompt,
        }
        if with_tokens:
            values.update(self._token_details())
        elif self.params.prompt_logprobs:
            values["prefill"] = [lmi_token(token) for token in self.prompt_details]
        if best_of is not None:
            values["best_of_sequences"] = best_of
        return build(LmiDetails, **values)

    def _token_details(self) -> dict[str, Any]:
        values: dict[str, Any] = {"tokens": [lmi_token(token) for token in self.tokens]}
        if self.params.top_n_tokens:
            values["top_tokens"] = [[lmi_token(top) for top in token.top_tokens] for token in self.tokens]
        if self.params.prompt_logprobs:
            values["prefill"] = [lmi_token(token) for token in self.prompt_details]
        return values

    def sequence(self) -> LmiSequence:
        """This sequence as one of a best_of answer's other sequences."""
        return build(LmiSequence, finish_reason=self.finish_reason.value if self.finish_reason else None,
                     generated_tokens=self.generated_tokens, **self._token_details(),
                     generated_text=self.generated_text)

    def response(self, best_of: list[LmiSequence] | None = None) -> LmiResponse:
        """The answer for this sequence; with `best_of` (n > 1) details are always there, as in LMI's best_of
        response (output_formatter._json_output_formatter_best_of)."""
        if not self.params.details and best_of is None:
            return build(LmiResponse, generated_text=self.generated_text)
        return build(LmiResponse, generated_text=self.generated_text, details=self.details(best_of=best_of))


def build_response(results: list[Accumulator], is_batch: bool, returned: int, generated: int) -> Any:
    """`{"generated_text": ...}` for a string input, `[{...}, ...]` for a list input (`is_batch`); `results`
    hold each input's `generated` sequences in turn, of which the best `returned` are answered."""
    bodies = []
    for start in range(0, len(results), generated):
        ranked = sorted(results[start:start + generated], key=lambda result: result.mean_log_prob, reverse=True)
        best_of = [other.sequence() for other in ranked[1:returned]] if returned > 1 else None
        bodies.append(body(ranked[0].response(best_of)))
    return bodies if is_batch else bodies[0]
