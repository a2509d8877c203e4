"""Turning prompts into token ids for the engine, off the event loop: plain text, and chat messages through
the tokenizer's chat template.

One thread for the whole app: Hugging Face fast tokenizers are not safe to call concurrently, and a long
prompt (or a chat template render) must not block the event loop. The engine contract allows the server
to use `engine.tokenizer` from its own thread (see `handlers.engine`).
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from handlers.engine import Engine, InvalidRequest


class PromptTokenizer:
    def __init__(self) -> None:
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tokenizer")

    def close(self) -> None:
        self._thread.shutdown(wait=False, cancel_futures=True)

    async def encode(self, engine: Engine, text: str) -> list[int]:
        return await self._run(_encode, engine.tokenizer, text, True)

    async def decode(self, engine: Engine, ids: list[int]) -> str:
        return await self._run(lambda: engine.tokenizer.decode(ids))

    async def chat(self, engine: Engine, messages: list[dict[str, str]]) -> tuple[str, list[int]]:
        """The chat prompt for `messages` (ending with the assistant's turn) and its token ids.

        The ids come from encoding the rendered template without adding special tokens: the template already
        writes them (a second BOS would change the model's answer); vLLM encodes chat prompts the same way."""
        prompt = await self._run(render_chat, engine.tokenizer, messages)
        return prompt, await self._run(_encode, engine.tokenizer, prompt, False)

    async def _run(self, function: Any, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._thread, function, *args)


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
