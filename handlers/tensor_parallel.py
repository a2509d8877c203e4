"""Tensor parallelism across ranks: sharded loading and keeping every rank's forward passes in step.

Ranks are started by DeepSpeed's launcher (`deepspeed --num_gpus N --module ...`, as LMI started its
DeepSpeed workers) and joined with torch.distributed: NCCL on GPUs, gloo on CPU. Rank 0 serves HTTP and
schedules; every forward pass it runs is first broadcast, as a small command, to the other ranks, which
replay it on their own shard (their `SlotKVCache` mirrors rank 0's). The model's own collectives
(AutoTP's all-reduces) then line up across ranks.

Loading scales with N: the model is built on the meta device (`accelerate.init_empty_weights`, the
same idea as DeepSpeed's `OnDevice(device="meta")` and LMI's low-memory loading), AutoTP shards the empty
modules, and each rank reads only its own slice of every tensor from the safetensors files
(`safe_open(...).get_slice`), so peak host memory per rank is about 1/N of the sharded weights plus the
replicated ones (embeddings, norms).
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import time
from pathlib import Path
from typing import Any, Callable

logger = logging.getLogger(__name__)

HEARTBEAT_SECONDS = 2.0  # rank 0 pings idle workers this often (keeps the control group's timeout away)
WATCH_SECONDS = 0.25  # rank 0 checks that every rank's process is alive this often
CONTROL_TIMEOUT = datetime.timedelta(seconds=60)


def init_distributed(device_kind: str) -> tuple[int, int, Any]:
    """Join the process group the launcher described in the environment. Returns (rank, world, control group)."""
    import deepspeed
    import torch.distributed as dist

    backend = "nccl" if device_kind == "cuda" else "gloo"
    if device_kind == "cuda":
        import torch
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    deepspeed.init_distributed(dist_backend=backend)
    # Commands travel on their own gloo group: small pickled objects, and a timeout of its own so a dead
    # rank turns into an error instead of a hang.
    control = dist.new_group(backend="gloo", timeout=CONTROL_TIMEOUT)
    return dist.get_rank(), dist.get_world_size(), control


def load_sharded_model(model_path: str, dtype: Any, tp_size: int, trust_remote_code: bool,
                       progress: Callable[[str], None]) -> Any:
    """Build the model on meta, let AutoTP shard it, then fill this rank's slices from safetensors."""
    import deepspeed
    import torch
    import torch.distributed as dist
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_path, trust_remote_code=trust_remote_code)
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code,
                                                 attn_implementation="sdpa")
    model.eval()
    # init_inference re-creates buffers from the meta model as uninitialized memory (measured: rotary
    # inv_freq became garbage), so keep the real ones and put them back.
    buffers = {name: buffer.clone() for name, buffer in model.named_buffers()}
    module = deepspeed.init_inference(model, tensor_parallel={"tp_size": tp_size}, dtype=dtype,
                                      replace_with_kernel_inject=False).module
    rank = dist.get_rank() if dist.is_initialized() else 0
    with torch.no_grad():
        for name, buffer in module.named_buffers():
            if name in buffers:
                buffer.copy_(buffers[name].to(buffer.device, buffer.dtype))
        _load_slices(module, Path(model_path), rank, config, progress)
    return module


def _load_slices(module: Any, model_path: Path, rank: int, config: Any, progress: Callable[[str], None]) -> None:
    from safetensors import safe_open
    from tqdm import tqdm

    files = _tensor_files(model_path)
    parameters = dict(module.named_parameters(remove_duplicate=False))
    tied = bool(getattr(config, "tie_word_embeddings", False))
    handles = {path: safe_open(str(path), framework="pt") for path in set(files.values())}
    missing = []
    show = rank == 0
    for name, parameter in tqdm(parameters.items(), desc="loading this rank's shard", unit="tensor",
                                disable=not show):
        source = name if name in files else None
        if source is None and tied and name.endswith("lm_head.weight"):
            source = next((key for key in files if key.endswith("embed_tokens.weight")), None)
        if source is None:
            missing.append(name)
            continue
        full = handles[files[source]].get_slice(source)
        index = _shard_index(tuple(parameter.shape), tuple(full.get_shape()), rank, name)
        parameter.copy_(full[index].to(parameter.dtype))
    if missing:
        raise RuntimeError(f"{len(missing)} parameters are not in the checkpoint at {model_path}: "
                           f"{', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
    if show:
        progress(f"loaded {len(parameters)} tensors (this rank's slices) from {len(handles)} safetensors file(s)")


def _shard_index(local: tuple[int, ...], full: tuple[int, ...], rank: int, name: str) -> tuple[slice, ...]:
    """AutoTP splits a tensor along one dimension into equal contiguous parts, rank r taking part r (the
    degree divides the head counts, which the plan checks); replicated tensors have the full shape."""
    if len(local) != len(full):
        raise RuntimeError(f"{name}: sharded shape {local} does not match the checkpoint's {full}")
    index = []
    for size, full_size in zip(local, full):
        if size == full_size:
            index.append(slice(None))
        elif full_size % size == 0:
            index.append(slice(rank * size, (rank + 1) * size))
        else:
            raise RuntimeError(f"{name}: shard size {size} does not divide the checkpoint's {full_size}")
    return tuple(index)


def _tensor_files(model_path: Path) -> dict[str, Path]:
    """tensor name -> safetensors file, from the index if the checkpoint is split."""
    index = model_path / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {name: model_path / file for name, file in weight_map.items()}
    single = model_path / "model.safetensors"
    if single.is_file():
        from safetensors import safe_open
        with safe_open(str(single), framework="pt") as handle:
            return {name: single for name in handle.keys()}
    raise RuntimeError(f"tensor_parallel_degree > 1 loads each rank's slice from safetensors, but {model_path} "
                       "has no model.safetensors or model.safetensors.index.json; convert the checkpoint with "
                       "save_pretrained(safe_serialization=True)")


def _exchange_pids(control_group: Any) -> list[int]:
    """Every rank's process id, by rank (the ranks share a host: DeepSpeed's launcher starts them locally)."""
    import torch.distributed as dist

    pids: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(pids, os.getpid(), group=control_group)
    return pids


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A killed child stays a zombie until the launcher reaps it; it is dead all the same.
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return True


class TensorParallelRunner:
    """Rank 0's model runner: broadcasts each operation to the other ranks, then runs it locally."""

    heartbeat_interval = HEARTBEAT_SECONDS

    def __init__(self, runner: Any, control_group: Any):
        self.runner = runner
        self.cache = runner.cache
        self.device = runner.device
        self._group = control_group
        self._peers = _exchange_pids(control_group)[1:]

    def watch(self, abort: Callable[[str], None]) -> None:
        """Call `abort(reason)` as soon as another rank's process is gone. A collective waiting for a dead
        rank may never return (gloo and NCCL wait for their timeout; DeepSpeed's shared-memory all-reduce
        spins), so this is checked from a thread of its own rather than from the step."""
        import threading

        def check() -> None:
            while True:
                for rank, pid in enumerate(self._peers, start=1):
                    if not _alive(pid):
                        abort(f"tensor-parallel rank {rank} (pid {pid}) died")
                        return
                time.sleep(WATCH_SECONDS)

        threading.Thread(target=check, name="rank-watchdog", daemon=True).start()

    def assign(self, sequence: int, blocks: list[int]) -> None:
        self._send(("assign", sequence, blocks))
        self.runner.assign(sequence, blocks)

    def prefill(self, sequences: list[int], chunks: list[list[int]], starts: list[int], all_logits: bool = False) -> Any:
        self._send(("prefill", sequences, chunks, starts, all_logits))
        return self.runner.prefill(sequences, chunks, starts, all_logits)

    def decode(self, sequences: list[int], token_ids: list[int], positions: list[int]) -> Any:
        self._send(("decode", sequences, token_ids, positions))
        return self.runner.decode(sequences, token_ids, positions)

    def heartbeat(self) -> None:
        """Raises when a rank is gone (its end of the control group is closed)."""
        self._send(("ping",))

    def shutdown(self) -> None:
        try:
            self._send(("stop",))
        except Exception:  # a rank may already be gone; nothing left to tell it
            pass

    def _send(self, command: tuple) -> None:
        import torch.distributed as dist
        dist.broadcast_object_list([command], src=0, group=self._group)


def worker_loop(runner: Any, control_group: Any) -> None:
    """Ranks > 0: replay rank 0's operations until told to stop (or rank 0 disappears, which raises)."""
    import torch.distributed as dist

    _exchange_pids(control_group)
    operations = {"assign": runner.assign, "prefill": runner.prefill, "decode": runner.decode, "ping": lambda: None}
    while True:
        box = [None]
        dist.broadcast_object_list(box, src=0, group=control_group)
        op, *args = box[0]
        if op == "stop":
            return
        operations[op](*args)
