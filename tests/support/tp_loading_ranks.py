"""One rank of the sharded-loading test (`tests/integration/test_tp_loading.py`), started by DeepSpeed's
launcher like the server's ranks. Not shipped.

Every rank loads each model of the spec with the server's own sharded loader, runs one forward pass over
fixed token ids, and rank 0 saves the logits. Then the last model generates greedily through the
server's runners (rank 0's `TensorParallelRunner`, the others' `worker_loop`). Finally, with `--fail`,
one rank's forward pass raises an out-of-memory error (a fault injected the way a real one surfaces, from
inside `ModelRunner.decode`), and rank 0 records how the failure was decided: the outcome file says
whether rank 0 saw the error as a failure of the whole server and with which message. Exit statuses:
0 = finished, 3 = rank 0 decided the server must stop (what the engine loop then does), 1 = any rank
failing on its own (what the server's ranks do).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--spec", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--fail", type=int, default=None, help="the rank whose third decode runs out of memory")
    args = parser.parse_args()
    spec = json.loads(args.spec.read_text())

    import torch

    from handlers.engine import EngineOutOfMemory
    from handlers.model_runner import ModelRunner
    from handlers.paged_kv_cache import PagedKVCache, attention_window
    from handlers.tensor_parallel import TensorParallelRunner, init_distributed, load_sharded_model, worker_loop

    groups = init_distributed("cpu", startup_timeout=300)
    torch.set_num_threads(1)
    ids = torch.tensor(spec["input_ids"], dtype=torch.long)
    errors = {}
    module = None
    for name, path in spec["models"].items():
        try:
            # BLOOM has no SDPA attention in transformers; the loader is the same either way
            attention = "eager" if name == "bloom" else "sdpa"
            module = load_sharded_model(path, torch.float32, groups.world, False, lambda text: None, attention)
            with torch.inference_mode():
                logits = module(input_ids=ids, use_cache=False).logits
        except Exception as error:  # deterministic: every rank fails the same model the same way
            errors[name] = f"{type(error).__name__}: {error}"
            continue
        if groups.rank == 0:
            torch.save(logits, args.out / f"{name}.pt")
    if groups.rank == 0:
        (args.out / "errors.json").write_text(json.dumps(errors))

    window, layer_types = attention_window(module.config)
    cache = PagedKVCache(module.config.num_hidden_layers, num_blocks=8, block_size=16, max_sequences=2,
                         max_length=64, device="cpu", sliding_window=window, layer_types=layer_types)
    runner = ModelRunner(module, cache)
    if args.fail is not None and groups.rank == args.fail:
        calls = [0]
        decode = runner.decode

        def failing_decode(sequences, token_ids, positions):
            calls[0] += 1
            if calls[0] == 3:
                raise EngineOutOfMemory("out of memory: injected by the test")
            return decode(sequences, token_ids, positions)

        runner.decode = failing_decode
    if groups.rank != 0:
        try:
            worker_loop(runner, groups)
        except EngineOutOfMemory:
            # DeepSpeed's launcher kills every rank within its 1 s poll once one exits non-zero; give rank 0's
            # watchdog (0.25 s) the time to record what it saw before that, so the outcome file exists.
            import time
            time.sleep(2.0)
            raise
        return 0

    # Rank 0 handles SIGTERM, as the server's rank 0 does (uvicorn): when a worker dies, DeepSpeed's launcher
    # sends every rank SIGTERM within its 1 s poll and SIGKILL 30 s later. Killed by the SIGTERM at once, this
    # rank's watchdog (which is what is under test) would have under a second to see the death and record it,
    # and a loaded 2-core machine, its other ranks spinning in the shared-memory all-reduce, missed that.
    import signal
    signal.signal(signal.SIGTERM, lambda *_: None)
    tp = TensorParallelRunner(runner, groups)
    tokens: list[int] = []
    outcome: dict = {"tokens": tokens}  # what was generated before a failure, whichever way it is reported

    def abort(reason: str) -> None:  # what the engine loop's abort does: fail everything, the server exits
        outcome["aborted"] = reason
        _finish(args.out, outcome, 3)

    tp.watch(abort)
    prompt = spec["prompt"]
    try:
        tp.assign(1, [1, 2, 3, 4])  # sequence slot 1 (slot 0 stays unused), blocks 1-4 (0 is the scratch block)
        logits = tp.prefill([1], [prompt], [0])[0]
        for step in range(spec["new_tokens"]):
            token = int(logits.argmax())
            tokens.append(token)
            logits = tp.decode([1], [token], [len(prompt) + step])[0]
    except EngineOutOfMemory as error:  # would be served on as if nothing happened: the defect
        outcome["recoverable"] = str(error)
    except Exception as error:
        outcome["failed"] = f"{type(error).__name__}: {error}"
    if "failed" in outcome or "recoverable" in outcome:
        _finish(args.out, outcome, 3)
    tp.shutdown()
    _finish(args.out, outcome, 0)
    return 0


def _finish(out: Path, outcome: dict, code: int) -> None:
    """Write the outcome and exit at once: after a failure, threads may be stuck in a collective."""
    (out / "outcome.json").write_text(json.dumps(outcome))
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    try:
        sys.exit(main())
    except BaseException:
        import traceback
        traceback.print_exc()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(1)
