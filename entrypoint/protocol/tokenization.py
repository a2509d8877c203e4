"""Turning prompts into token ids for the engine, off the event loop: plain text, and chat messages through
the tokenizer's chat template.

Tokenizing runs on threads, never on the event loop: a long prompt (or a chat template render) must not
block it. Hugging Face fast tokenizers are not safe to call concurrently, so each thread has its own
tokenizer object. The engine contract allows the server to use `engine.tokenizer` from its own thread (see
`handlers.engine`).

Two defences against huge prompts (measured: three concurrent 9 MB prompts, rejected in the end as too
long, delayed a one-token request from 0.5 s to 31 s):
  - the work per prompt is bounded before tokenizing: one token never covers more than the longest string
    in the vocabulary, so a prompt with more characters than that times the engine's token limit cannot
    fit, and is refused at once without being tokenized;
  - short prompts have their own lane (thread and tokenizer copy), so they never queue behind long ones.
"""

from __future__ import annotations

import asyncio
import copy
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from handlers.engine import Engine, InvalidRequest

#: prompts up to this many characters are tokenized on the short lane (a few ms each at most)
SHORT_PROMPT_CHARS = 8192
#: margin on the characters-per-token bound for normalizers that merge characters (NFC composes a letter
#: and its accent into one; Hangul jamo compose three into one): a prompt is refused only when it could not
#: fit even then
NORMALIZER_MARGIN = 4


class PromptTokenizer:
    def __init__(self) -> None:
        self._short = _Lane("tokenizer-short", own_copy=False)
        self._long = _Lane("tokenizer-long", own_copy=True)
        self._bounds: dict[int, int | None] = {}  # id(tokenizer) -> most characters one token covers

    def close(self) -> None:
        self._short.close()
        self._long.close()

    async def encode(self, engine: Engine, text: str, field: str = "inputs") -> list[int]:
        await self._check_length(engine, len(text), field)
        return await self._lane(len(text)).run(engine.tokenizer, _encode, text, True)

    async def decode(self, engine: Engine, ids: list[int]) -> str:
        return await self._lane(len(ids)).run(engine.tokenizer, lambda tokenizer: tokenizer.decode(ids))

    async def chat(self, engine: Engine, messages: list[dict[str, str]]) -> tuple[str, list[int]]:
        """The chat prompt for `messages` (ending with the assistant's turn) and its token ids.

        The ids come from encoding the rendered template without adding special tokens: the template already
        writes them (a second BOS would change the model's answer); vLLM encodes chat prompts the same way."""
        size = sum(len(str(message.get("content") or "")) for message in messages)
        await self._check_length(engine, size, "messages")
        lane = self._lane(size)
        prompt = await lane.run(engine.tokenizer, render_chat, messages)
        return prompt, await lane.run(engine.tokenizer, _encode, prompt, False)

    def _lane(self, size: int) -> _Lane:
        return self._short if size <= SHORT_PROMPT_CHARS else self._long

    async def _check_length(self, engine: Engine, characters: int, field: str) -> None:
        if characters <= SHORT_PROMPT_CHARS:
            return  # cheap either way
        key = id(engine.tokenizer)
        if key not in self._bounds:  # read on a lane: the tokenizer is only ever used from one thread at a time
            self._bounds[key] = await self._short.run(engine.tokenizer, max_chars_per_token)
        per_token = self._bounds[key]
        if per_token is None:
            return
        limit = engine.max_total_tokens * per_token * NORMALIZER_MARGIN
        if characters > limit:
            raise InvalidRequest(
                f"{field} has {characters} characters, so it cannot fit the limit of {engine.max_total_tokens} "
                f"tokens (max_tokens / the model's context): no token of this model's vocabulary covers more "
                f"than {per_token} characters, so at most {limit} characters can fit; shorten the prompt", field)


def max_chars_per_token(tokenizer: Any) -> int | None:
    """The most characters of text one token can stand for: the longest vocabulary string (added tokens
    included). Byte-level vocabularies (GPT-2, Llama 3) spell each byte as one character and a character is
    at least one byte; SentencePiece spells a space as one "▁"; byte-fallback tokens ("<0x41>") only make
    the bound looser. None when the tokenizer does not list its vocabulary."""
    get_vocab = getattr(tokenizer, "get_vocab", None)
    if not callable(get_vocab):
        return None
    vocab = get_vocab()
    return max((len(token) for token in vocab), default=0) or None


class _Lane:
    """One thread; with `own_copy`, it tokenizes with its own copy of the tokenizer (made on first use), so
    it can run at the same time as the other lane."""

    def __init__(self, name: str, own_copy: bool):
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)
        self._own_copy = own_copy
        self._copies: dict[int, Any] = {}
        self._lock = threading.Lock()

    def close(self) -> None:
        self._thread.shutdown(wait=False, cancel_futures=True)

    async def run(self, tokenizer: Any, function: Any, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._thread, self._call, tokenizer, function, args)

    def _call(self, tokenizer: Any, function: Any, args: tuple) -> Any:
        return function(self._tokenizer(tokenizer), *args)

    def _tokenizer(self, tokenizer: Any) -> Any:
        if not self._own_copy:
            return tokenizer
        with self._lock:
            key = id(tokenizer)
            if key not in self._copies:
                self._copies = {key: copy.deepcopy(tokenizer)}  # one engine per server: keep only the latest
            return self._copies[key]


def render_chat(tokenizer: Any, messages: list[dict[str, str]]) -> str:
    if not getattr(tokenizer, "chat_template", None):
        raise InvalidRequest("the served model's tokenizer has no chat template, so chat messages cannot be turned "
                             "into a prompt; send a formatted prompt to /v1/completions (or \"inputs\" to "
                             "/invocations) instead", "messages")
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    except Exception as exc:  # the template's own checks (raise_exception), e.g. "roles must alternate"
        raise InvalidRequest(f"the model's chat template rejected the messages: {exc}", "messages") from None


def _encode(tokenizer: Any, text: str, add_special_tokens: bool) -> list[int]:
    if add_special_tokens:  # the tokenizer's default; minimal tokenizers (tests) take only the text
        return list(tokenizer.encode(text))
    return list(tokenizer.encode(text, add_special_tokens=False))
