"""Tensor parallelism across ranks: sharded loading and keeping every rank's forward passes in step.

Ranks are started by DeepSpeed's launcher (`deepspeed --num_gpus N --module ...`, as LMI started its
DeepSpeed workers) and joined with torch.distributed: NCCL on GPUs, gloo on CPU. Rank 0 serves HTTP and
schedules; every forward pass it runs is first broadcast, as a small command of int64 tensors
(`handlers.command_channel`), to the other ranks, which replay it on their own shard (their `PagedKVCache`
mirrors rank 0's). The model's own collectives (AutoTP's all-reduces) then line up across ranks.

A step that fails on any rank ends the server, on every rank alike. A failure inside a forward pass leaves
the other ranks inside that pass's collectives, waiting for a partner that will not come; pairing them
with the next step's collectives instead would compute garbage or hang. So no rank treats a failure as
recoverable (not even out-of-memory, which a single process survives): a worker rank that fails exits
non-zero, rank 0 sees it die and fails every request with "rank N died"; rank 0 failing raises an error
that is not `EngineOutOfMemory`, so the engine loop fails every request and the server exits non-zero.
DeepSpeed's launcher then ends the remaining ranks.

Loading scales with N: the model is built on the meta device (`accelerate.init_empty_weights`, the
same idea as DeepSpeed's `OnDevice(device="meta")` and LMI's low-memory loading), AutoTP shards the empty
modules, and each rank reads only its own slice of every tensor from the safetensors files
(`handlers.sharded_checkpoint`: transformers' key mapping, DeepSpeed's own shard layout), so peak host
memory per rank is about 1/N of the sharded weights plus the replicated ones (embeddings, norms).
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
import threading
import time
from dataclasses import dataclass
from enum import IntEnum
from pathlib import Path
from typing import Any, Callable

from handlers.command_channel import CommandChannel
from handlers.runner import Runner

logger = logging.getLogger(__name__)

HEARTBEAT_SECONDS = 2.0  # rank 0 pings idle workers this often (keeps the control group's timeout away)
WATCH_SECONDS = 0.25  # rank 0 checks that every rank's process is alive this often
#: how long one step's command may take to reach every rank before a collective on the control group
#: fails (a live rank answers within a step; the idle heartbeat keeps waiting workers inside it)
STEP_TIMEOUT = datetime.timedelta(seconds=60)
#: how long a failed step on rank 0 looks for a dead rank to blame before blaming the step itself: a
#: killed rank's sockets close (and the collective fails) a moment before its process turns into a zombie
DEATH_GRACE_SECONDS = 5.0


@dataclass(frozen=True)
class ProcessGroups:
    rank: int
    world: int
    startup: Any  # gloo, timeout = the model loading timeout: the rendezvous after every rank has loaded
    control: Any  # gloo, timeout = STEP_TIMEOUT: per-step commands and heartbeats


def init_distributed(device_kind: str, startup_timeout: float,
                     step_timeout: datetime.timedelta = STEP_TIMEOUT) -> ProcessGroups:
    """Join the process group the launcher described in the environment.

    Two gloo groups of our own besides the model's: commands need a short timeout so a dead rank turns
    into an error instead of a hang, while the rendezvous after loading must wait as long as the slowest
    rank loads (up to model_loading_timeout), so it gets a group with that timeout."""
    import deepspeed
    import torch.distributed as dist

    backend = "nccl" if device_kind == "cuda" else "gloo"
    if device_kind == "cuda":
        import torch
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    deepspeed.init_distributed(dist_backend=backend, timeout=datetime.timedelta(seconds=startup_timeout))
    startup = dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=startup_timeout))
    control = dist.new_group(backend="gloo", timeout=step_timeout)
    if device_kind == "cpu":
        # Every rank has returned from init_distributed, so every rank has mapped every other rank's buffer.
        dist.barrier(group=startup)
        release_shared_memory_name(dist.get_rank())
    return ProcessGroups(dist.get_rank(), dist.get_world_size(), startup, control)


def shared_memory_name(rank: int, environ: Any = os.environ) -> Path:
    """The POSIX shared-memory file of `rank`'s buffer for DeepSpeed's CPU all-reduce
    (ops/csrc/cpu/comm/shm.cpp: deepspeed_allreduce_buffer_<uid>_<MASTER_ADDR>_<MASTER_PORT>_<rank>)."""
    return Path("/dev/shm") / (f"deepspeed_allreduce_buffer_{os.getuid()}_{environ.get('MASTER_ADDR', '')}_"
                               f"{environ.get('MASTER_PORT', '')}_{rank}")


def release_shared_memory_name(rank: int) -> None:
    """DeepSpeed 0.19.8 never unlinks its CPU all-reduce buffers (shm.cpp's shared_close is never called): each
    server run left 69 MB per rank in /dev/shm, 14 GB after a day of test runs on a 24 GB machine, where the
    OOM killer then took a rank. Once every rank has mapped the buffer, its name is no longer needed: removing
    it keeps the mappings, and the kernel frees the memory when the ranks exit, however they exit."""
    with contextlib.suppress(FileNotFoundError):
        shared_memory_name(rank).unlink()


def load_sharded_model(model_path: str, dtype: Any, tp_size: int, trust_remote_code: bool,
                       progress: Callable[[str], None], attn_implementation: str = "sdpa") -> Any:
    """Build the model on meta, let AutoTP shard it, then fill this rank's slices from safetensors."""
    import deepspeed
    import torch
    import torch.distributed as dist
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    from handlers.sharded_checkpoint import checkpoint_sources, load_rank_slices, restore_shard_layouts, tensor_files

    config = AutoConfig.from_pretrained(model_path, trust_remote_code=trust_remote_code)
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code,
                                                 attn_implementation=attn_implementation)
    model.eval()
    # init_inference re-creates buffers from the meta model as uninitialized memory (measured: rotary
    # inv_freq became garbage), so keep the real ones and put them back.
    buffers = {name: buffer.clone() for name, buffer in model.named_buffers()}
    # Which checkpoint tensor fills which parameter: decided on the model as transformers built it, before
    # AutoTP replaces its layers (and unties lm_head from the embedding).
    files = tensor_files(Path(model_path))
    sources = checkpoint_sources(model, list(files))
    module = deepspeed.init_inference(model, tensor_parallel={"tp_size": tp_size}, dtype=dtype,
                                      replace_with_kernel_inject=False).module
    restore_shard_layouts(module)
    _per_rank_attention_configs(module)
    rank = dist.get_rank() if dist.is_initialized() else 0
    with torch.no_grad():
        for name, buffer in module.named_buffers():
            if name in buffers:
                buffer.copy_(buffers[name].to(buffer.device, buffer.dtype))
        load_rank_slices(module, files, sources, rank, progress, show_progress=rank == 0)
    return module


def _per_rank_attention_configs(module: Any) -> None:
    """Attention modules that read the query width from the shared config at run time get a copy of it with
    this rank's query heads. transformers' Phi-3 splits its fused `qkv_proj` output at
    `self.config.num_attention_heads * head_dim` (the whole model's width); AutoTP updates the module's own
    head-count attributes (`num_key_value_heads`, ...) but not the config every layer shares, so without this
    a rank would read its keys and values as queries."""
    import copy

    from deepspeed.module_inject.layers import fused_LinearLayer

    for attention in module.modules():
        qkv, config = getattr(attention, "qkv_proj", None), getattr(attention, "config", None)
        widths = getattr(qkv, "_subparam_shard_widths", None)
        if isinstance(qkv, fused_LinearLayer) and config is not None and widths and hasattr(attention, "head_dim"):
            local = copy.copy(config)
            local.num_attention_heads = widths[0][qkv.tp_index] // attention.head_dim  # widths[0]: the query part
            attention.config = local


def rendezvous(groups: ProcessGroups) -> list[int]:
    """Every rank's process id, by rank, once every rank has loaded (the ranks share a host: DeepSpeed's
    launcher starts them locally). Waits on the start-up group: a rank may load much later than another."""
    import torch.distributed as dist

    pids: list[Any] = [None] * groups.world
    dist.all_gather_object(pids, os.getpid(), group=groups.startup)
    return pids


class Op(IntEnum):
    """Operation codes of the commands rank 0 sends (see `TensorParallelRunner` for each one's fields)."""

    STOP = 0
    PING = 1
    ASSIGN = 2
    PREFILL = 3
    DECODE = 4


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


class RankFailure(RuntimeError):
    """A tensor-parallel step failed; the ranks can no longer be kept in step, so the engine must stop.

    Deliberately not `EngineOutOfMemory`: the engine loop fails every request and the server exits
    non-zero instead of serving on with ranks whose collectives no longer pair up."""


class TensorParallelRunner(Runner):
    """Rank 0's model runner: sends each operation to the other ranks, then runs it locally."""

    heartbeat_interval = HEARTBEAT_SECONDS

    def __init__(self, runner: Runner, groups: ProcessGroups):
        self.runner = runner
        self.cache = runner.cache
        self.device = runner.device
        self._channel = CommandChannel(groups.control)
        self._peers = rendezvous(groups)[1:]
        self._deaths: dict[int, str] = {}  # pid -> why it died (read once: the watchdog and the step both ask)
        self._deaths_lock = threading.Lock()

    def watch(self, abort: Callable[[str], None]) -> None:
        """Call `abort(reason)` as soon as another rank's process is gone. A collective waiting for a dead
        rank may never return (gloo and NCCL wait for their timeout; DeepSpeed's shared-memory all-reduce
        spins), so this is checked from a thread of its own rather than from the step."""

        def check() -> None:
            while True:
                dead = self._dead_peer()
                if dead is not None:
                    abort(dead)
                    return
                time.sleep(WATCH_SECONDS)

        threading.Thread(target=check, name="rank-watchdog", daemon=True).start()

    # fields: [sequence], blocks
    def assign(self, sequence: int, blocks: list[int]) -> None:
        self._step(lambda: self.runner.assign(sequence, blocks), Op.ASSIGN, [sequence], blocks)

    # fields: [all_logits], sequences, starts, chunk lengths, the chunks concatenated
    def prefill(self, sequences: list[int], chunks: list[list[int]], starts: list[int],
                all_logits: bool = False) -> Any:
        lengths, flat = [len(c) for c in chunks], [t for c in chunks for t in c]
        return self._step(lambda: self.runner.prefill(sequences, chunks, starts, all_logits), Op.PREFILL,
                          [int(all_logits)], sequences, starts, lengths, flat)

    # fields: sequences, token_ids, positions
    def decode(self, sequences: list[int], token_ids: list[int], positions: list[int]) -> Any:
        return self._step(lambda: self.runner.decode(sequences, token_ids, positions), Op.DECODE, sequences,
                          token_ids, positions)

    def heartbeat(self) -> None:
        """Raises when a rank is gone (its end of the control group is closed)."""
        self._step(lambda: None, Op.PING)

    def shutdown(self) -> None:
        try:
            self._channel.send(Op.STOP)
        except Exception:  # a rank may already be gone; nothing left to tell it
            pass

    def _step(self, local: Callable[[], Any], op: Op, *fields: Any) -> Any:
        try:
            self._channel.send(op, *fields)
            return local()
        except Exception as error:
            raise self._failure(op, error) from error

    def _failure(self, op: Op, error: Exception) -> RankFailure:
        """Name the cause: a rank that died (its collective fails first, so wait a moment for its process
        to show as dead), else the error on rank 0 itself."""
        deadline = time.monotonic() + DEATH_GRACE_SECONDS
        while True:
            dead = self._dead_peer()
            if dead is not None:
                return RankFailure(dead)
            if time.monotonic() >= deadline:
                return RankFailure(f"tensor-parallel step {op.name.lower()} failed on rank 0 "
                                   f"({type(error).__name__}: {error}); the ranks cannot be kept in step after a "
                                   "failed step, so the server stops")
            time.sleep(WATCH_SECONDS)

    def _dead_peer(self) -> str | None:
        for rank, pid in enumerate(self._peers, start=1):
            if not _alive(pid):
                with self._deaths_lock:
                    if pid not in self._deaths:
                        cause = _take_failure(pid)
                        died = f"tensor-parallel rank {rank} (pid {pid}) died"
                        self._deaths[pid] = f"{died}: {cause}" if cause else died
                    return self._deaths[pid]
        return None


def _failure_file(pid: int) -> Path:
    """Where a worker rank leaves the reason it failed for rank 0 (ranks share a host and its temp dir)."""
    import tempfile
    return Path(tempfile.gettempdir()) / f"lmi-tensor-parallel-rank-{pid}.failure"


def _take_failure(pid: int) -> str | None:
    path = _failure_file(pid)
    try:
        text = path.read_text(encoding="utf-8").strip()
        path.unlink()
    except OSError:
        return None
    return text or None


def worker_loop(runner: Runner, groups: ProcessGroups) -> None:
    """Ranks > 0: replay rank 0's operations until told to stop. Any failure (rank 0 gone, an error in a
    forward pass) raises out of here, and the rank exits non-zero (see the module docstring)."""
    rank0 = rendezvous(groups)[0]
    channel = CommandChannel(groups.control)
    try:
        _replay(runner, channel)
    except Exception as error:
        if _alive(rank0):  # rank 0 only sees this process die; leave it the reason, so its error names the cause
            _failure_file(os.getpid()).write_text(f"{type(error).__name__}: {error}"[:2000], encoding="utf-8")
        raise


def _replay(runner: Runner, channel: CommandChannel) -> None:
    while True:
        op, fields = channel.receive()
        if op == Op.STOP:
            return
        if op == Op.DECODE:
            runner.decode(*(field.tolist() for field in fields))
        elif op == Op.PREFILL:
            (all_logits,), sequences, starts, lengths, flat = (field.tolist() for field in fields)
            chunks, offset = [], 0
            for length in lengths:
                chunks.append(flat[offset:offset + length])
                offset += length
            runner.prefill(sequences, chunks, starts, bool(all_logits))
        elif op == Op.ASSIGN:
            runner.assign(int(fields[0][0]), fields[1].tolist())
        elif op != Op.PING:
            raise RuntimeError(f"rank 0 sent an unknown operation code {op}")
