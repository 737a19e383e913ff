"""The graph streams from the feature stage to the model stage on a CPU-only Ray whose actors hold every CPU slot.

A real local Ray with 2 CPUs: a one-actor stage taking 1 CPU (as the feature actors do), then two actors of 0.5 CPU
(as the CPU model actors do), with the graph's block setting (``MAX_BLOCK_BYTES``: one row per block) and no stage
between them. The first stage yields each model call as one row (as the featurizer packs a call's rows,
pipeline/calls.py). The second stage must start on the first stage's early calls, not once the first stage has
processed all of them; each of its calls must get exactly one of the first stage's calls, and the calls must spread
over both actors.
"""

from __future__ import annotations

import os
import time

import pytest

ray = pytest.importorskip("ray")

from whisper_batch.pipeline.graph import MAX_BLOCK_BYTES  # noqa: E402

ROWS = 32  # one input block, as the featurizer gets a whole input block of many shards per call
PER_CALL = 2
SECONDS_PER_CALL = 0.5  # the first stage's time per yielded pair


@pytest.fixture(scope="module")
def two_cpu_ray():
    if ray.is_initialized():
        pytest.skip("a Ray is already running in this process")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


class Slow:
    """Yields its block's rows two at a time as one row (as the featurizer yields its calls), half a second apart."""

    def __call__(self, batch):
        xs = [int(x) for x in batch["x"]]
        for i in range(0, len(xs), PER_CALL):
            time.sleep(SECONDS_PER_CALL)
            yield {"xs": [xs[i : i + PER_CALL]], "first_done": [time.time()]}


class Stamp:
    """A model call: twice as long as the first stage takes per pair, so one actor alone would fall behind."""

    def __call__(self, batch):
        time.sleep(2 * SECONDS_PER_CALL)
        call = [[int(x) for x in xs] for xs in batch["xs"]]
        n = len(call)
        return {"first_done": batch["first_done"], "second": [time.time()] * n, "call": call, "rows": [n] * n,
                "pid": [os.getpid()] * n}


def test_model_stage_starts_early_and_gets_the_featurizer_calls(two_cpu_ray):
    ds = ray.data.from_items([{"x": i} for i in range(ROWS)], override_num_blocks=1)
    ds = ds.map_batches(Slow, compute=ray.data.ActorPoolStrategy(size=1), batch_size=None, num_cpus=1)
    ds = ds.map_batches(Stamp, compute=ray.data.ActorPoolStrategy(size=2), batch_size=1, num_cpus=0.5)
    ds.context.target_max_block_size = MAX_BLOCK_BYTES
    rows = list(ds.iter_rows())
    assert sorted(x for r in rows for x in r["call"]) == list(range(ROWS))  # every row once
    first_stage_end = max(r["first_done"] for r in rows)
    second_stage_start = min(r["second"] for r in rows)
    # streaming within the first stage's one task: the second stage works while most of its rows are still to come
    # (with Ray's default block size, the task's rows would leave as one block when it ends)
    assert second_stage_start < first_stage_end - SECONDS_PER_CALL * ROWS / PER_CALL / 2, (
        second_stage_start, first_stage_end)
    # every call is one of the first stage's, alone: rows 2k and 2k+1
    assert all(r["rows"] == 1 for r in rows)
    calls = {tuple(r["call"]) for r in rows}
    assert calls == {(x, x + 1) for x in range(0, ROWS, PER_CALL)}, sorted(calls)
    assert len({r["pid"] for r in rows}) == 2  # both model actors got calls
