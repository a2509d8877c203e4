"""The one engine interface every inference engine implements, and the values that cross it.

The HTTP server and the DJL `handle()` both sit on an `Engine` (through `handlers.engine_loop`), so the
CPU/AutoTP rolling batch, FastGen and kernel-injection engines are interchangeable, and tests can drive
the server with a fake engine. The shape follows vLLM's `LLMEngine` (add_request / step / abort) and
nano-vllm: the caller feeds requests in, calls `step()` in a loop, and receives per-request outputs.

Threading contract: one thread (the engine loop) calls every method; engines need no locks. Two
exceptions, both read-only: the HTTP layer calls `validate()` (pure) before submitting, and tokenizes with
`engine.tokenizer.encode()` on its own thread.
"""

from __future__ import annotations

import abc
import time
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Callable

from pydantic import BaseModel, ConfigDict, Field, field_validator


class FinishReason(str, Enum):
    LENGTH = "length"  # max_new_tokens reached (or the request's max_tokens / the model's context)
    EOS_TOKEN = "eos_token"  # the model produced an end-of-sequence token
    STOP_SEQUENCE = "stop_sequence"  # a stop sequence appeared in the generated text
    ERROR = "error"  # the engine failed this request
    CANCELLED = "cancelled"  # the client went away or the request timed out


#: temperatures below this sample like greedy decoding and are decoded greedily: dividing logits by a tinier
#: one overflows to inf/nan (vLLM's _SAMPLING_EPS is the same bound)
MIN_SAMPLING_TEMPERATURE = 1e-5


#: The sampling parameters' ranges, declared once: `SamplingParams` and the LMI and OpenAI request schemas
#: (which publish them in /openapi.json) take them from here, so every front end refuses the same values.
#: OpenAI's schema narrows temperature to OpenAI's own 0-2 and widens seed to what OpenAI clients send (it is
#: folded into the engine's range), and top_p 0 there means greedy.
TEMPERATURE_RANGE: dict[str, float] = {"ge": 0.0, "le": 100.0}
TOP_P_RANGE: dict[str, float] = {"gt": 0.0, "le": 1.0}
REPETITION_PENALTY_RANGE: dict[str, float] = {"gt": 0.0, "le": 10.0}
OPENAI_PENALTY_RANGE: dict[str, float] = {"ge": -2.0, "le": 2.0}  # presence_penalty, frequency_penalty
SEED_RANGE: dict[str, int] = {"ge": 0, "le": 2**63 - 1}
TOP_N_TOKENS_RANGE: dict[str, int] = {"ge": 0, "le": 20}


class SamplingParams(BaseModel):
    """Per-request generation parameters, LMI's `parameters` object. Ranges are validated here so every
    front end (LMI schema, OpenAI schema, DJL handle) rejects the same bad values the same way."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_new_tokens: int = Field(256, ge=0, description="Most tokens to generate; 0 only scores the prompt "
                                "(with prompt_logprobs).")
    temperature: float = Field(1.0, **TEMPERATURE_RANGE, description="Softmax temperature; 0 means greedy.")
    top_k: int = Field(0, ge=0, description="Sample from the k most likely tokens; 0 disables.")
    top_p: float = Field(1.0, **TOP_P_RANGE, description="Nucleus sampling probability mass.")
    repetition_penalty: float = Field(1.0, **REPETITION_PENALTY_RANGE,
                                      description="CTRL-style repetition penalty; 1 disables.")
    presence_penalty: float = Field(0.0, **OPENAI_PENALTY_RANGE, description="OpenAI presence penalty.")
    frequency_penalty: float = Field(0.0, **OPENAI_PENALTY_RANGE, description="OpenAI frequency penalty.")
    do_sample: bool = Field(False, description="Sample instead of greedy decoding.")
    seed: int | None = Field(None, **SEED_RANGE, description="Random seed; the same seed gives the same text.")
    stop_sequences: tuple[str, ...] = Field((), description="Generation stops when the text contains one of these.")
    stop_token_ids: tuple[int, ...] = Field((), description="Generation stops after one of these token ids "
                                            "(which, like EOS, is not part of the text).")
    ignore_eos: bool = Field(False, description="Keep generating after the end-of-sequence token.")
    details: bool = Field(False, description="Return finish reason and per-token id, text and log-probability.")
    return_full_text: bool = Field(False, description="Prepend the prompt to generated_text.")
    top_n_tokens: int = Field(0, **TOP_N_TOKENS_RANGE,
                              description="Also return the n most likely alternatives per token.")
    prompt_logprobs: bool = Field(False, description="Return each prompt token's log-probability (the first "
                                  "output carries them; top_n_tokens alternatives each).")

    @field_validator("stop_sequences", mode="before")
    @classmethod
    def _stop(cls, value: Any) -> Any:
        if value is None:
            return ()
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, (list, tuple)) or not all(isinstance(item, str) for item in value):
            raise ValueError("expected a string or a list of strings")
        if any(item == "" for item in value):
            raise ValueError("stop sequences must not be empty strings")
        if len(value) > 16:
            raise ValueError(f"at most 16 stop sequences, got {len(value)}")
        return tuple(value)

    @property
    def greedy(self) -> bool:
        return not self.do_sample or self.temperature < MIN_SAMPLING_TEMPERATURE


@dataclass
class GenerationRequest:
    request_id: str
    prompt: str
    prompt_token_ids: list[int]
    params: SamplingParams
    arrival_time: float = field(default_factory=time.monotonic)


@dataclass(frozen=True)
class Token:
    id: int
    text: str
    log_prob: float
    special: bool = False
    top_tokens: tuple["Token", ...] = ()


@dataclass(frozen=True)
class RequestOutput:
    """What one step produced for one request."""

    request_id: str
    tokens: tuple[Token, ...]  # new tokens this step (one per decode step; none for a prefill chunk)
    text: str  # new visible text this step (text that may start a stop sequence is held back)
    finished: bool = False
    finish_reason: FinishReason | None = None
    error: str | None = None
    prompt_tokens: int = 0
    generated_tokens: int = 0  # total so far
    # With params.prompt_logprobs: the prompt's tokens with their log-probabilities, on the request's first
    # output only (the first prompt token has no context: its log_prob is nan).
    prompt_token_details: tuple[Token, ...] = ()


@dataclass(frozen=True)
class EngineHealth:
    healthy: bool
    detail: str = "ok"


@dataclass(frozen=True)
class EngineStats:
    running: int = 0  # requests in the running batch
    waiting: int = 0  # requests admitted but not yet (fully) prefilled
    kv_cache_usage: float = 0.0  # fraction of the KV cache's blocks reserved by admitted requests, 0..1
    kv_cache_tokens: int = 0  # token positions reserved by admitted requests
    kv_cache_capacity_tokens: int = 0  # token positions the KV cache holds in all


class InvalidRequest(ValueError):
    """The request cannot be served as asked (HTTP 400). `field` names the offending parameter."""

    def __init__(self, message: str, field: str | None = None):
        super().__init__(message)
        self.field = field


class EngineOutOfMemory(RuntimeError):
    """The engine ran out of memory serving a request (HTTP 507)."""


class Engine(abc.ABC):
    """An inference engine: requests go in, one `step()` advances every running request by one token."""

    #: the Hugging Face tokenizer of the served model (chat template, counts)
    tokenizer: Any
    #: the largest prompt + generated tokens one request may have (max_tokens capped by the model context)
    max_total_tokens: int
    #: a short name for logs and /models ("autotp", "fastgen", "kernel_injection", "fake")
    name: str

    @abc.abstractmethod
    def add_request(self, request: GenerationRequest) -> None:
        """Admit a request; it joins the running batch at the next step. Raises `InvalidRequest`."""

    @abc.abstractmethod
    def step(self) -> list[RequestOutput]:
        """Run one engine step; returns the outputs of every request that progressed or finished."""

    @abc.abstractmethod
    def cancel(self, request_id: str) -> RequestOutput | None:
        """Drop a request and free its batch slot; returns its final output if it was still active."""

    @abc.abstractmethod
    def health(self) -> EngineHealth:
        """Whether the engine can serve (after a crash it stays unhealthy)."""

    @abc.abstractmethod
    def has_unfinished(self) -> bool:
        """Whether any admitted request is not finished yet."""

    #: seconds between `heartbeat()` calls while idle; None: the engine needs none
    heartbeat_interval: float | None = None

    def heartbeat(self) -> None:
        """Called while idle every `heartbeat_interval` s; raises when the engine can no longer serve
        (e.g. a tensor-parallel rank died), which fails the engine like a crashed step."""

    def watch(self, abort: Callable[[str], None]) -> None:
        """Called once when the engine loop starts: an engine with parts outside the loop's thread (tensor-
        parallel ranks) watches them and calls `abort(reason)` the moment one is lost."""

    def stats(self) -> EngineStats:
        return EngineStats()

    def validate(self, request: GenerationRequest) -> None:
        """Raise `InvalidRequest` when prompt + max_new_tokens exceeds `max_total_tokens`."""
        prompt = len(request.prompt_token_ids)
        wanted = prompt + request.params.max_new_tokens
        if prompt == 0:
            raise InvalidRequest("the prompt is empty (0 tokens); send at least one token", "inputs")
        if wanted > self.max_total_tokens:
            raise InvalidRequest(
                f"prompt ({prompt} tokens) + max_new_tokens ({request.params.max_new_tokens}) = {wanted} tokens "
                f"exceeds the limit of {self.max_total_tokens} tokens (max_tokens / the model's context)",
                "max_new_tokens")

    def shutdown(self) -> None:
        """Release resources (worker ranks, memory)."""
