"""The tensor-parallel control plane between two real CPU ranks (gloo, joined by `init_distributed` as the
server's ranks are): commands of any size arrive intact as int64 tensors (the payload buffer grows in step
on both sides), the rendezvous after loading waits for a rank that loads for longer than the per-step
timeout, and a rank that stops answering between steps makes the other's next command fail instead of
hanging."""

from __future__ import annotations

import datetime
import multiprocessing
import os
import time
import traceback

import pytest

from tests.support.ports import free_port

pytestmark = pytest.mark.slow

STEP_TIMEOUT_S = 3  # short, so the test shows the start-up wait is not bound by it
SLOW_LOAD_S = 3 * STEP_TIMEOUT_S
# (op, fields): empty, small, one that needs the payload to grow (several times over the initial 4096)
COMMANDS = [(7, []), (4, [[1, 2, 3], [10, 11, 12]]), (3, [[0], list(range(5000)), list(range(30000))]),
            (5, [[], [9]]), (2, [list(range(100))])]


def _rank(rank: int, port: int, results: multiprocessing.Queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE="2", LOCAL_SIZE="2")
    try:
        import torch

        from handlers.command_channel import CommandChannel
        from handlers.tensor_parallel import init_distributed, rendezvous

        groups = init_distributed("cpu", startup_timeout=300, step_timeout=datetime.timedelta(seconds=STEP_TIMEOUT_S))
        if rank == 1:
            time.sleep(SLOW_LOAD_S)  # loading a large shard
        pids = rendezvous(groups)
        channel = CommandChannel(groups.control)
        received = []
        for op, fields in COMMANDS:
            if rank == 0:
                channel.send(op, *[torch.tensor(f, dtype=torch.int64) if i % 2 else f for i, f in enumerate(fields)])
            else:
                got_op, got = channel.receive()
                received.append((got_op, [t.tolist() for t in got]))
        failure = None
        if rank == 0:
            time.sleep(SLOW_LOAD_S)  # rank 0 stops sending (stuck, or gone)
        else:
            started = time.monotonic()
            try:
                channel.receive()
            except Exception as error:
                failure = (type(error).__name__, round(time.monotonic() - started, 1))
        results.put((rank, pids, received, failure, None))
    except BaseException:
        results.put((rank, None, None, None, traceback.format_exc()))


def test_commands_arrive_intact_start_up_waits_for_a_slow_rank_and_a_silent_rank_times_out():
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    port = free_port()
    processes = [context.Process(target=_rank, args=(rank, port, results)) for rank in (0, 1)]
    for process in processes:
        process.start()
    try:
        outcome = {}
        for _ in processes:
            rank, pids, received, failure, error = results.get(timeout=300)
            assert error is None, f"rank {rank} failed:\n{error}"
            outcome[rank] = (pids, received, failure)
    finally:
        for process in processes:
            process.join(timeout=60)
            if process.is_alive():
                process.kill()
    assert outcome[0][0] == outcome[1][0] == [p.pid for p in processes]  # the rendezvous outlasted the step timeout
    assert outcome[1][1] == [(op, fields) for op, fields in COMMANDS]
    assert outcome[1][2] is not None, "a receive with no sender must fail (after the step timeout), not hang"
