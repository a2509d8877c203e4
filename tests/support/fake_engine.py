"""A deterministic `Engine` for testing the serving stack without a model.

Generation is a fixed pattern: the n-th generated token of a request is the letter
`"abcdefghijklmnopqrstuvwxyz"[(n + seed) % 26]` (seed only matters with do_sample), one character per token,
so tests can predict every response. With top_n_tokens each token lists that many capital letters as more
likely alternatives (log_prob -0.1; the chosen token's is -0.5), so the chosen token is never among them.
With prompt_logprobs the first output carries the prompt's tokens (`prompt_token_details`: the first has
log_prob nan, the others -1.0); max_new_tokens 0 finishes right away after that (prompt scoring). Knobs make the failure paths reachable: a per-step delay, a crash on
step N, EngineOutOfMemory on step N or for prompts containing a marker, an error finish for prompts
containing a marker, and eos after a given number of tokens.
"""

from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from handlers.engine import (
    Engine,
    EngineHealth,
    EngineOutOfMemory,
    EngineStats,
    FinishReason,
    GenerationRequest,
    InvalidRequest,
    RequestOutput,
    Token,
)

ALPHABET = "abcdefghijklmnopqrstuvwxyz"
EOS_ID = 0


class CharTokenizer:
    """One token per character (id = code point); id 0 is the end-of-sequence token.

    Only `encode` is what the server needs; `decode` and `eos_token_id` mirror the Hugging Face names."""

    eos_token_id = EOS_ID

    def __len__(self) -> int:  # the vocabulary: every code point
        return 0x110000

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return [ord(ch) for ch in text]

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return "".join(chr(i) for i in ids if i != EOS_ID)


class OutOfMemoryFor(EngineOutOfMemory):
    """EngineOutOfMemory naming the affected requests (the optional `request_ids` the loop honours)."""

    def __init__(self, message: str, request_ids: list[str]):
        super().__init__(message)
        self.request_ids = request_ids


def expected_text(count: int, seed: int = 0) -> str:
    """The text the fake generates for `count` tokens."""
    return "".join(ALPHABET[(n + seed) % 26] for n in range(count))


@dataclass
class _Active:
    request: GenerationRequest
    generated: list[int] = field(default_factory=list)
    text: str = ""  # all generated text
    emitted: int = 0  # characters of `text` already returned (the rest is held back for stop sequences)
    first: bool = True  # no output returned yet


class FakeEngine(Engine):
    name = "fake"

    def __init__(self, *, max_batch: int = 8, max_total_tokens: int = 4096, step_delay: float = 0.0,
                 eos_at: int | None = None, fail_at_step: int | None = None, oom_at_step: int | None = None,
                 fail_marker: str = "[fail]", oom_marker: str = "[oom]", tokenizer: Any = None):
        self.tokenizer = tokenizer or CharTokenizer()
        self.max_total_tokens = max_total_tokens
        self.max_batch = max_batch
        self.step_delay = step_delay
        self.eos_at = eos_at
        self.fail_at_step = fail_at_step
        self.oom_at_step = oom_at_step
        self.fail_marker = fail_marker
        self.oom_marker = oom_marker
        self.steps = 0
        self.crashed: str | None = None
        self.added: list[str] = []
        self.cancelled: list[str] = []
        self.shut_down = False
        self.step_threads: set[str] = set()  # names of threads that called step(): must be exactly one
        self._waiting: list[_Active] = []
        self._running: list[_Active] = []

    # ---- Engine interface ---------------------------------------------------------------------------
    def add_request(self, request: GenerationRequest) -> None:
        self.validate(request)
        if any(a.request.request_id == request.request_id for a in self._waiting + self._running):
            raise InvalidRequest(f"request id {request.request_id!r} is already active", "request_id")
        self.added.append(request.request_id)
        self._waiting.append(_Active(request))

    def step(self) -> list[RequestOutput]:
        self.step_threads.add(threading.current_thread().name)
        self.steps += 1
        if self.step_delay:
            time.sleep(self.step_delay)
        if self.fail_at_step is not None and self.steps >= self.fail_at_step:
            self.crashed = f"fake engine crashed at step {self.steps}"
            raise RuntimeError(self.crashed)
        if self.oom_at_step is not None and self.steps == self.oom_at_step:
            raise EngineOutOfMemory(f"fake engine out of memory at step {self.steps}")
        while self._waiting and len(self._running) < self.max_batch:
            self._running.append(self._waiting.pop(0))
        oom = [a.request.request_id for a in self._running if self.oom_marker in a.request.prompt]
        if oom:
            for request_id in oom:
                self._drop(request_id)
            raise OutOfMemoryFor(f"fake engine out of memory for {len(oom)} request(s)", oom)
        outputs = [self._advance(active) for active in list(self._running)]
        self._running = [a for a in self._running if a.request.request_id not in
                         {o.request_id for o in outputs if o.finished}]
        return outputs

    def cancel(self, request_id: str) -> RequestOutput | None:
        active = self._drop(request_id)
        if active is None:
            return None
        self.cancelled.append(request_id)
        return RequestOutput(request_id, (), "", finished=True, finish_reason=FinishReason.CANCELLED,
                             prompt_tokens=len(active.request.prompt_token_ids),
                             generated_tokens=len(active.generated))

    def health(self) -> EngineHealth:
        return EngineHealth(self.crashed is None, self.crashed or "ok")

    def has_unfinished(self) -> bool:
        return bool(self._waiting or self._running)

    def stats(self) -> EngineStats:
        return EngineStats(running=len(self._running), waiting=len(self._waiting))

    def summary(self) -> dict[str, Any]:
        return {"engine": self.name, "why": "test double", "dtype": "none", "max_rolling_batch_size": self.max_batch,
                "max_total_tokens": self.max_total_tokens}

    def shutdown(self) -> None:
        self.shut_down = True

    # ---- generation ---------------------------------------------------------------------------------
    @property
    def running_ids(self) -> list[str]:
        return [a.request.request_id for a in self._running]

    def _drop(self, request_id: str) -> _Active | None:
        for queue in (self._waiting, self._running):
            for active in queue:
                if active.request.request_id == request_id:
                    queue.remove(active)
                    return active
        return None

    def _advance(self, active: _Active) -> RequestOutput:
        request, params = active.request, active.request.params
        rid, prompt_tokens = request.request_id, len(request.prompt_token_ids)
        if self.fail_marker in request.prompt:
            return RequestOutput(rid, (), "", finished=True, finish_reason=FinishReason.ERROR,
                                 error="fake engine failed this request", prompt_tokens=prompt_tokens)
        n = len(active.generated)
        if params.max_new_tokens == 0:
            return self._out(active, None, FinishReason.LENGTH)
        seed = (params.seed or 0) if not params.greedy else 0
        if self.eos_at is not None and n + 1 >= self.eos_at and not params.ignore_eos:
            token = Token(EOS_ID, "", -0.01, special=True)
            active.generated.append(EOS_ID)
            return self._out(active, token, FinishReason.EOS_TOKEN)
        letter = ALPHABET[(n + seed) % 26]
        alternatives = tuple(Token(ord(capital), capital, -0.1) for capital in ALPHABET.upper()[:params.top_n_tokens])
        token = Token(ord(letter), letter, -0.5, top_tokens=alternatives)
        active.generated.append(token.id)
        active.text += letter
        for stop in params.stop_sequences:
            at = active.text.find(stop)
            if at >= 0:
                active.text = active.text[:at]
                return self._out(active, token, FinishReason.STOP_SEQUENCE)
        reason = FinishReason.LENGTH if len(active.generated) >= params.max_new_tokens else None
        return self._out(active, token, reason)

    def _out(self, active: _Active, token: Token | None, reason: FinishReason | None) -> RequestOutput:
        """Return new text, holding back a tail that could still become a stop sequence."""
        if reason is None:
            hold = max((k for stop in active.request.params.stop_sequences for k in range(len(stop))
                        if k and active.text.endswith(stop[:k])), default=0)
            visible_end = len(active.text) - hold
        else:
            visible_end = len(active.text)
        text = active.text[active.emitted:visible_end]
        active.emitted = max(active.emitted, visible_end)
        prompt_details: tuple[Token, ...] = ()
        if active.first and active.request.params.prompt_logprobs:
            ids = active.request.prompt_token_ids
            prompt_details = tuple(Token(i, self.tokenizer.decode([i]), math.nan if at == 0 else -1.0)
                                   for at, i in enumerate(ids))
        active.first = False
        return RequestOutput(active.request.request_id, (token,) if token else (), text, finished=reason is not None,
                             finish_reason=reason, prompt_tokens=len(active.request.prompt_token_ids),
                             generated_tokens=len(active.generated), prompt_token_details=prompt_details)
