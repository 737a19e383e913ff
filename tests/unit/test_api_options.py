"""The Python API's options and the dataset stages' row handling, without Ray."""

from __future__ import annotations

import pyarrow as pa
import pytest

import whisper_batch
from whisper_batch.pipeline.audio import AudioError
from whisper_batch.pipeline.config import ConfigError, RunConfig
from whisper_batch.pipeline.dataset import (
    AudioColumnError,
    audio_of,
    carried_name,
    check_audio_column,
    decode_row,
    encode_row,
)


def test_options_by_flag_name_field_name_or_section():
    cfg = whisper_batch.load_config("configs/cpu-fast.yaml", beam_size=3, cpu_actors=2, decode__patience=1.5,
                                    vad=True)
    assert (cfg.decode.beam_size, cfg.ray.cpu_actors, cfg.decode.patience, cfg.audio.vad) == (3, 2, 1.5, True)
    assert cfg.decode.padding_step_seconds == 1.0  # the file's own fields stay
    again = whisper_batch.load_config(cfg, language="en")  # a loaded config is a starting point too
    assert again.decode.beam_size == 3 and again.decode.language == "en"
    assert whisper_batch.load_config({"decode": {"beam_size": 2}}).decode.beam_size == 2


@pytest.mark.parametrize("api", ["run", "transcribe", "transcribe_dataset"])
def test_an_unknown_option_names_the_valid_ones(api):
    args = {"run": ("in.jsonl", "out"), "transcribe": (["a.wav"],), "transcribe_dataset": (None,)}[api]
    with pytest.raises(ConfigError, match=r"unknown option 'beam'; valid options: model, language, task, "
                                          r"beam_size, word_timestamps, vad, any config field \(.*cpu_actors"):
        getattr(whisper_batch, api)(*args, beam=5)


def test_an_ambiguous_or_bad_value_is_refused():
    with pytest.raises(ConfigError, match="decode.beam_size"):
        whisper_batch.load_config(beam_size="wide")
    assert whisper_batch.load_config().decode == RunConfig().decode


def test_a_dataset_without_the_audio_column_names_what_it_has():
    check_audio_column(["audio_filepath", "x"], "audio_filepath")
    with pytest.raises(AudioColumnError, match=r"no audio column 'audio_filepath' \(manifest.audio_field\); its "
                                               r"columns: path, speaker\. .*audio_field="):
        check_audio_column(["path", "speaker"], "audio_filepath")


def test_audio_cells_paths_bytes_and_structs(tmp_path):
    assert audio_of("a/b.wav", 3, "/data") == ("/data/a/b.wav", None)
    assert audio_of("s3://bucket/b.wav", 3, "/data") == ("s3://bucket/b.wav", None)
    assert audio_of(b"RIFF..", 3) == ("row 3 (bytes)", b"RIFF..")
    assert audio_of({"bytes": b"xx", "path": "clip.flac"}, 0) == ("clip.flac", b"xx")
    assert audio_of({"bytes": None, "path": "rel.flac"}, 0, "/d") == ("/d/rel.flac", None)
    for empty in ({"bytes": None, "path": None}, b"", None, ""):
        name, data = audio_of(empty, 7)
        assert isinstance(data, AudioError) and str(data).split(":")[0] in ("empty", "not found")


def test_a_users_row_travels_with_its_types():
    table = pa.table({"n": pa.array([7], pa.int16()), "when": pa.array([1.5], pa.float32()),
                      "tags": pa.array([["a", "b"]]), "nested": pa.array([{"k": 1}])})
    back = decode_row(encode_row(table))
    assert back.equals(table) and back.schema == table.schema
    assert isinstance(encode_row(table), str)  # JSON-safe: packs carry their members as JSON


def test_user_columns_that_clash_with_ours_are_renamed():
    assert carried_name("text", "text") == "reference"
    assert carried_name("transcript", "transcript") == "reference"
    assert [carried_name(n, "ref") for n in ("text", "error", "extra_x", "speaker")] == [
        "extra_text", "extra_error", "extra_extra_x", "speaker"]
