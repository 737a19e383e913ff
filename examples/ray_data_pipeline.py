"""whisper-batch as stages of your own Ray Data pipeline: read → your filter/map → transcribe_dataset → write.

    python examples/ray_data_pipeline.py [OUTPUT_FOLDER]

Reads examples/manifest.jsonl as a Ray dataset, keeps the rows it wants, adds a column of its own, transcribes with
the packaged tiny.en and writes Parquet wherever it likes. A file that cannot be read comes out as a row with its
`error`, beside the others.
"""

import os
import sys

import pyarrow.parquet as pq
import ray

import whisper_batch

HERE = os.path.dirname(os.path.abspath(__file__))


def main(output: str) -> None:
    ray.init(include_dashboard=False, log_to_driver=False)
    ds = ray.data.read_json(os.path.join(HERE, "manifest.jsonl"))
    # your own stages: paths made absolute (the workers run elsewhere), one file that does not exist, a column of yours
    ds = ds.map(lambda r: {**r, "audio_filepath": os.path.join(HERE, r["audio_filepath"]), "source": "examples"})
    ds = ds.union(ray.data.from_items([{"id": "missing", "audio_filepath": os.path.join(HERE, "missing.wav"),
                                        "text": None, "source": "examples"}]))
    ds = ds.filter(lambda r: r["id"] != "skip-me")
    transcripts = whisper_batch.transcribe_dataset(ds, language="en")
    transcripts.write_parquet(output)
    table = pq.read_table(output).sort_by("id")
    for row in table.select(["id", "source", "text", "error"]).to_pylist():
        print(f"{row['id']:>10}  {row['error'] or row['text']}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "out/ray-data-example")
