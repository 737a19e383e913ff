"""The graph streams from the feature stage to the model stage on a CPU-only Ray whose actors hold every CPU slot.

A real local Ray with 2 CPUs: a one-actor stage taking 1 CPU (as the feature actors do), ``split_blocks``, then two
actors of 0.5 CPU (as the CPU model actors do). The second stage must start on the first stage's early blocks, not
once the first stage has processed all of them.
"""

from __future__ import annotations

import time

import pytest

ray = pytest.importorskip("ray")

from pipeline.graph import split_blocks  # noqa: E402

BLOCKS = 12
SECONDS_PER_BLOCK = 0.5


@pytest.fixture(scope="module")
def two_cpu_ray():
    if ray.is_initialized():
        pytest.skip("a Ray is already running in this process")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


class Slow:
    def __call__(self, batch):
        start = time.time()
        time.sleep(SECONDS_PER_BLOCK)
        return {"x": batch["x"], "first_done": [start + SECONDS_PER_BLOCK] * len(batch["x"])}


class Stamp:
    def __call__(self, batch):
        return {"x": batch["x"], "first_done": batch["first_done"], "second": [time.time()] * len(batch["x"])}


def test_model_stage_starts_before_the_feature_stage_ends(two_cpu_ray):
    ds = ray.data.from_items([{"x": i} for i in range(BLOCKS * 4)], override_num_blocks=BLOCKS)
    ds = ds.map_batches(Slow, compute=ray.data.ActorPoolStrategy(size=1), batch_size=None, num_cpus=1)
    ds = split_blocks(ds, 2)
    ds = ds.map_batches(Stamp, compute=ray.data.ActorPoolStrategy(size=2), batch_size=2, num_cpus=0.5)
    rows = list(ds.iter_rows())
    assert sorted(r["x"] for r in rows) == list(range(BLOCKS * 4))  # every row once
    first_stage_end = max(r["first_done"] for r in rows)
    second_stage_start = min(r["second"] for r in rows)
    # streaming: the second stage works while the first still has most of its blocks to do
    assert second_stage_start < first_stage_end - SECONDS_PER_BLOCK * 3, (second_stage_start, first_stage_end)
