"""One short generation through the engine before the server reports ready.

The first forward passes of a freshly loaded model pay one-time costs (allocations, lazy initialisation in
torch and DeepSpeed, the KV cache's first buffers; ~2 s on a 2-core CPU for the embedded model), which would
otherwise land on the first user's request. A model that loads but cannot generate also fails here, at start-
up, with the reason, instead of on every request while /ping says healthy.

It goes through the engine loop like any request, so the engine is only ever called from the loop thread.
Two tokens: the first comes from the prefill pass, the second from a decode step; both paths run once.
"""

from __future__ import annotations

from handlers.engine import GenerationRequest, SamplingParams
from handlers.engine_loop import EngineLoop

PROMPT = "Hello"
PHASE = "warming up: one 2-token generation"


class WarmUpError(RuntimeError):
    """The warm-up generation failed; `str()` says why."""


def warm_up(loop: EngineLoop, tokenizer, timeout: float) -> None:
    ids = list(tokenizer.encode(PROMPT))
    request = GenerationRequest(request_id="warm-up", prompt=PROMPT, prompt_token_ids=ids,
                                params=SamplingParams(max_new_tokens=2, ignore_eos=True))
    try:
        (outputs,) = loop.generate([request], timeout=timeout)
    except TimeoutError:
        raise WarmUpError(f"the warm-up generation (2 tokens) did not finish within {timeout:g} s") from None
    except Exception as error:  # noqa: BLE001 - the loop refused it (engine unavailable): say so, whatever it is
        raise WarmUpError(f"the warm-up generation failed: {error}") from None
    failed = [output.error for output in outputs if output.error]
    if failed:
        raise WarmUpError(f"the warm-up generation failed: {failed[-1]}")
