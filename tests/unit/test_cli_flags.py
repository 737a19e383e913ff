"""The CLI's shortcut flags (--model, --language, --task, --beam-size, --word-timestamps, --vad) on run, transcribe and
submit, and `transcribe --output-format/--output-dir` (files as openai-whisper writes them)."""

import json
import re
from pathlib import Path

import pytest
from click.testing import CliRunner

from whisper_batch.jobs import cli_options
from whisper_batch.jobs.cli import main
from whisper_batch.pipeline.config import load_config

REPO = Path(__file__).resolve().parents[2]
FOX = str(REPO / "examples" / "fox.flac")
ANNA = str(REPO / "examples" / "anna.ogg")

# each command with what it needs besides the flags; nothing runs past the config (see `resolved`)
COMMANDS = {
    "run": ["run", "in.jsonl", "-o", "out"],
    "transcribe": ["transcribe", FOX],
    "submit": ["submit", "s3://b/in.jsonl", "-o", "s3://b/out", "--address", "http://head:8265"],
}


class _Resolved(Exception):
    """Raised by the load_config spy: the command stops once its config is built."""


@pytest.fixture
def resolved(monkeypatch):
    """The configs the commands resolved (through the real `load_config`), one per invocation."""
    seen = []

    def spy(*args, **kwargs):
        seen.append(load_config(*args, **kwargs))
        raise _Resolved

    monkeypatch.setattr(cli_options, "load_config", spy)
    return seen


def _config_of(command: str, argv: list[str], seen: list):
    result = CliRunner().invoke(main, COMMANDS[command] + argv)
    assert isinstance(result.exception, _Resolved), result.output + repr(result.exception)
    return seen.pop()


def _values(cfg) -> dict:
    return {
        "model.name": cfg.model.name, "decode.language": cfg.decode.language, "decode.task": cfg.decode.task,
        "decode.beam_size": cfg.decode.beam_size, "decode.word_timestamps": cfg.decode.word_timestamps,
        "audio.vad": cfg.audio.vad,
    }


DEFAULTS = {"model.name": None, "decode.language": None, "decode.task": "transcribe", "decode.beam_size": None,
            "decode.word_timestamps": False, "audio.vad": False}


@pytest.mark.parametrize("command", COMMANDS)
def test_each_flag_sets_its_config_key(command, resolved):
    assert _values(_config_of(command, [], resolved)) == DEFAULTS
    flags = ["--model", "some/ckpt.pt", "--language", "fr", "--task", "translate", "--beam-size", "4",
             "--word-timestamps", "--vad"]
    assert _values(_config_of(command, flags, resolved)) == {
        "model.name": "some/ckpt.pt", "decode.language": "fr", "decode.task": "translate", "decode.beam_size": 4,
        "decode.word_timestamps": True, "audio.vad": True,
    }
    # one at a time: each flag changes its own key and nothing else
    for argv, key, value in [(["--model", "m.pt"], "model.name", "m.pt"),
                             (["--language", "de"], "decode.language", "de"),
                             (["--task", "translate"], "decode.task", "translate"),
                             (["--beam_size", "2"], "decode.beam_size", 2),
                             (["--word_timestamps", "True"], "decode.word_timestamps", True),
                             (["--vad"], "audio.vad", True)]:
        assert _values(_config_of(command, argv, resolved)) == {**DEFAULTS, key: value}, argv


@pytest.mark.parametrize("command", COMMANDS)
def test_a_false_flag_overrides_the_config_file_and_an_absent_one_does_not(command, resolved, tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("decode: {word_timestamps: true, beam_size: 3}\naudio: {vad: true}\n")
    cfg = _config_of(command, ["--config", str(config)], resolved)
    assert (cfg.decode.word_timestamps, cfg.audio.vad, cfg.decode.beam_size) == (True, True, 3)
    cfg = _config_of(command, ["--config", str(config), "--no-word-timestamps", "--no-vad"], resolved)
    assert (cfg.decode.word_timestamps, cfg.audio.vad, cfg.decode.beam_size) == (False, False, 3)
    cfg = _config_of(command, ["--config", str(config), "--word_timestamps", "false"], resolved)
    assert cfg.decode.word_timestamps is False


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("flag, override, named", [
    (["--model", "a.pt"], "model.name=b.pt", "--model a.pt"),
    (["--language", "en"], "decode.language=fr", "--language en"),
    (["--task", "translate"], "decode.task=transcribe", "--task translate"),
    (["--beam-size", "5"], "decode.beam_size=3", "--beam-size 5"),
    (["--beam_size", "5"], "decode.beam_size=3", "--beam-size 5"),
    (["--word-timestamps"], "decode.word_timestamps=false", "--word-timestamps"),
    (["--no-vad"], "audio.vad=true", "--no-vad"),
])
def test_a_flag_contradicting_its_set_key_is_a_usage_error(command, flag, override, named):
    result = CliRunner().invoke(main, COMMANDS[command] + flag + ["--set", override])
    assert result.exit_code == 2, result.output
    key = override.partition("=")[0]
    assert f"Error: {named} contradicts --set {key}=" in result.output


@pytest.mark.parametrize("command", COMMANDS)
def test_a_flag_agreeing_with_its_set_key_is_accepted(command, resolved):
    argv = ["--model", "a.pt", "--set", "model.name=a.pt", "--language", "en", "--set", "decode.language=en",
            "--task", "translate", "--set", "decode.task=translate", "--beam-size", "3", "--set", "decode.beam_size=3",
            "--word-timestamps", "--set", "decode.word_timestamps=true", "--no-vad", "--set", "audio.vad=false"]
    assert _values(_config_of(command, argv, resolved)) == {
        "model.name": "a.pt", "decode.language": "en", "decode.task": "translate", "decode.beam_size": 3,
        "decode.word_timestamps": True, "audio.vad": False,
    }


def test_both_spellings_of_word_timestamps_must_agree():
    result = CliRunner().invoke(main, ["transcribe", FOX, "--word-timestamps", "--word_timestamps", "False"])
    assert result.exit_code == 2 and "contradicts --word-timestamps" in result.output, result.output
    result = CliRunner().invoke(main, ["transcribe", FOX, "--beam-size", "0"])
    assert result.exit_code == 2 and "0 is not in the range x>=1" in result.output, result.output
    result = CliRunner().invoke(main, ["transcribe", FOX, "--task", "summarize"])
    assert result.exit_code == 2 and "'summarize' is not one of 'transcribe', 'translate'" in result.output


# --- transcribe --output-format / --output-dir (the real tiny.en model) ---

SRT_CUE = re.compile(r"^(\d+)\n(\d\d:\d\d:\d\d,\d{3}) --> (\d\d:\d\d:\d\d,\d{3})\n(.+)$", re.MULTILINE)


def test_transcribe_writes_srt_named_after_the_audio(tmp_path):
    out = tmp_path / "subs"
    missing = str(tmp_path / "missing.wav")
    result = CliRunner().invoke(main, ["transcribe", "--output-format", "srt", "--output-dir", str(out), FOX, missing])
    assert result.exit_code == 0, result.output + repr(result.exception)
    assert sorted(p.name for p in out.iterdir()) == ["fox.srt"]  # the failed file writes nothing
    assert f"{missing}: ERROR not found" in result.stderr
    assert result.stdout.startswith(f"{FOX}: ") and "lazy dog" in result.stdout  # stdout as without the options
    cues = SRT_CUE.findall((out / "fox.srt").read_text(encoding="utf-8"))
    assert cues and cues[0][0] == "1" and cues[0][1] == "00:00:00,000"
    assert cues[-1][2] > cues[0][1] and "lazy dog" in cues[-1][3]


def test_transcribe_output_dir_alone_writes_every_format(tmp_path):
    result = CliRunner().invoke(main, ["transcribe", "-o", str(tmp_path), "--json", FOX, ANNA])
    assert result.exit_code == 0, result.output + repr(result.exception)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        f"{stem}.{fmt}" for stem in ("fox", "anna") for fmt in ("txt", "srt", "vtt", "json"))
    lines = [json.loads(line) for line in result.stdout.splitlines()]  # --json still prints one object per file
    assert [d["audio_filepath"] for d in lines] == [FOX, ANNA]

    vtt = (tmp_path / "fox.vtt").read_text(encoding="utf-8")
    assert vtt.startswith("WEBVTT\n\n")
    assert re.search(r"^00:00:00\.000 --> 00:00:0\d\.\d{3}\n.*lazy dog", vtt, re.MULTILINE), vtt
    doc = json.loads((tmp_path / "fox.json").read_text(encoding="utf-8"))
    assert set(doc) == {"text", "segments", "language", "duration"}
    assert "lazy dog" in doc["text"] and doc["language"] == "en" and 3 < doc["duration"] < 4
    assert isinstance(doc["segments"], list) and doc["segments"][0]["start"] == 0.0
    assert "lazy dog" in " ".join(s["text"] for s in doc["segments"])
    assert (tmp_path / "fox.txt").read_text(encoding="utf-8") == doc["text"].strip() + "\n"
    anna = json.loads((tmp_path / "anna.json").read_text(encoding="utf-8"))
    assert len(anna["segments"]) > 1 and "Anna" in (tmp_path / "anna.txt").read_text(encoding="utf-8")
    assert len(SRT_CUE.findall((tmp_path / "anna.srt").read_text(encoding="utf-8"))) == len(anna["segments"])


def test_transcribe_output_format_alone_writes_into_the_current_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(main, ["transcribe", "-f", "txt", FOX])
    assert result.exit_code == 0, result.output + repr(result.exception)
    assert [p.name for p in tmp_path.iterdir()] == ["fox.txt"]
    assert "lazy dog" in (tmp_path / "fox.txt").read_text(encoding="utf-8")


def test_transcribe_every_file_failed_writes_nothing_and_exits_1(tmp_path):
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["transcribe", "-f", "srt", "-o", str(out), str(tmp_path / "gone.wav")])
    assert result.exit_code == 1 and "ERROR not found" in result.stderr, result.output
    assert out.is_dir() and not list(out.iterdir())


@pytest.mark.parametrize("files", [[FOX, "elsewhere/fox.wav"], [FOX, FOX], [FOX, "s3://bucket/dir/fox.mp3?v=2"]])
def test_transcribe_two_files_with_one_base_name_is_an_error(tmp_path, files):
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["transcribe", "-f", "srt", "-o", str(out), *files])
    assert result.exit_code == 2, result.output
    assert f"{files[0]} and {files[1]} would both be written as {out / 'fox'}.srt" in result.output
    assert not out.exists()  # refused before anything was transcribed or written
