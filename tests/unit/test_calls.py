"""Model calls (pipeline/calls.py): which rows go to a model actor together, and a call's trip as one row."""

from __future__ import annotations

import numpy as np

from whisper_batch.pipeline.calls import (
    FEATURE_CHUNK_CALLS,
    CallShape,
    balance_order,
    call_order,
    iter_calls,
    pack_call,
    row_weight,
    unpack_calls,
)


def _items(shapes):
    """(windows, seconds) per row → featurized rows as the graph sees them."""
    return [{"id": i, "mel_frames": [3000] * n, "audio_seconds": float(s)} for i, (n, s) in enumerate(shapes)]


def test_each_model_call_holds_one_of_the_longest_rows():
    # three long files among short ones, the longest last as in the eval manifest
    items = _items([(1, 5), (1, 3), (1, 7), (1, 2), (1, 9), (1, 4), (1, 6), (2, 60), (4, 100), (3, 89)])
    out = balance_order(items, 4)
    assert sorted(r["id"] for r in out) == list(range(10))  # every row once
    calls = [[r["id"] for r in out[k : k + 4]] for k in range(0, len(out), 4)]
    assert [c[0] for c in calls] == [8, 9, 7]  # the three longest lead a call each, longest first
    assert all(not {7, 8, 9} & set(c[1:]) for c in calls)
    assert [r["id"] for r in balance_order(items, 16)][:3] == [8, 9, 7]


def test_with_padding_seconds_as_by_default_a_model_call_gets_rows_of_like_lengths():
    items = _items([(1, 5), (1, 3), (4, 100), (1, 7), (1, 2), (3, 89), (1, 9), (1, 4)])
    # longest first: the short rows share calls, so their encoder pass is short
    assert [r["id"] for r in call_order(items, 4, padded=True)] == [2, 5, 6, 3, 0, 7, 1, 4]
    # 30 s passes (decode.padding_seconds: null): each call leads with one of the longest
    assert [r["id"] for r in call_order(items, 4, padded=False)][::4] == [2, 5]


def test_calls_of_one_decoding_batch_of_windows():
    """On CPUs a call holds up to a batch of windows: a long recording alone, short rows many to a call, every row
    once; the first call is a few rows (the actors are waiting), the rows left at the end go to every actor."""
    rng = np.random.default_rng(0)
    shapes = [(1, float(s)) for s in rng.uniform(1, 15, 150)] + [(20, 600.0), (11, 330.0), (6, 170.0)]
    order = rng.permutation(len(shapes))
    items = [_items(shapes)[k] for k in order]
    shape = CallShape(rows=4, windows=16, actors=2)
    calls = list(iter_calls(iter(items), shape))

    assert sorted(r["id"] for c in calls for r in c) == list(range(len(shapes)))
    assert [r["id"] for r in calls[0]] == sorted((int(k) for k in order[:4]), key=lambda i: -shapes[i][1])
    for c in calls:
        assert sum(map(row_weight, c)) <= 16 or len(c) == 1  # a longer row is a call of its own
    longest = next(c for c in calls if any(r["id"] == 150 for r in c))
    assert len(longest) == 1
    # the calls between the first and the end's are full: 16 windows, or a row longer than that alone
    assert all(sum(map(row_weight, c)) == 16 or len(c) == 1 for c in calls[1:-3])
    assert [sum(map(row_weight, c)) for c in calls[-3:]] == [12, 12, 11]  # 35 windows left: three like calls
    # a long recording first (the driver stages rows longest first): the first call is that row alone
    assert [len(c) for c in iter_calls(iter(_items([(20, 600.0), (3, 80.0)] + [(1, 5.0)] * 5)), shape)][:1] == [1]
    # fewer rows than a call at the end: spread over the two actors
    small = list(iter_calls(iter(_items([(1, 5.0)] * 14)), shape))
    assert [len(c) for c in small] == [4, 5, 5]


def test_calls_of_rows_as_the_config_gives_them():
    """``ray.model_batch_size`` (or GPUs, or windows decoded in order): calls of that many rows, ordered a few calls at
    a time as before."""
    items = _items([(1, s) for s in range(1, 31)])
    shape = CallShape(rows=4, windows=None, actors=2)
    calls = list(iter_calls(iter(items), shape))
    assert [len(c) for c in calls] == [4] * 7 + [2]
    assert [r["id"] for r in calls[0]] == [3, 2, 1, 0]  # the first four rows, longest first
    # after the first call, FEATURE_CHUNK_CALLS calls' rows are ordered together: longest first across them
    chunk = [r["audio_seconds"] for c in calls[1 : 1 + FEATURE_CHUNK_CALLS] for r in c]
    assert chunk == sorted(chunk, reverse=True) and len(chunk) == 4 * FEATURE_CHUNK_CALLS


def test_a_call_travels_as_one_row_and_comes_back_whole():
    import pyarrow as pa

    from whisper_batch.pipeline.schema import FEATURE_SCHEMA

    mel = np.arange(80 * 300, dtype=np.float16).tobytes()
    items = [
        {"shard_id": 3, "row_index": i, "id": f"r{i}", "audio_filepath": f"{i}.wav", "uri": f"s3://b/{i}.wav",
         "offset": 0.0, "duration": None, "reference": None, "language": None, "extra_json": "{}", "mel": mel,
         "mel_frames": [300], "window_starts": [0.0], "audio_seconds": 3.0, "error": None, "decode_s": 0.01,
         "members_json": None, "window_maps": None}
        for i in range(3)
    ] + [{"shard_id": 3, "row_index": 3, "id": "bad", "audio_filepath": "3.wav", "uri": "3.wav", "offset": 0.0,
          "duration": None, "reference": None, "language": None, "extra_json": "{}", "mel": None, "mel_frames": [],
          "window_starts": [], "audio_seconds": None, "error": "decode: not audio", "decode_s": 0.0,
          "members_json": None, "window_maps": None}]
    one = pack_call(items, FEATURE_SCHEMA)
    assert one.num_rows == 1 and one.column("rows").to_pylist() == [4]
    assert unpack_calls(one) == items
    two = pa.concat_tables([one, pack_call(items[:1], FEATURE_SCHEMA)])
    assert [r["row_index"] for r in unpack_calls(two)] == [0, 1, 2, 3, 0]
