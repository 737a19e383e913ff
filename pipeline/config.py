"""Typed run configuration: frozen dataclasses, YAML loading, dotted overrides, redaction.

`load_config("configs/base.yaml", ["decode.beam_size=5"])` merges the YAML file over the defaults below, then the
overrides (values parsed as YAML scalars), and converts every value to the field's declared type. Unknown keys and
bad types are errors that name the key, so a typo never silently falls back to a default. The comment above each
field is its documentation: configs/base.yaml is written from these comments (tests/config_yaml.py).
"""

from __future__ import annotations

import copy
import dataclasses
import re
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Union

import yaml

from whisper_batch.model.constants import SAMPLE_RATE, TASKS

from .secrets import redact_options, redact_uri

DTYPES = ("auto", "float32", "float16", "bfloat16")
QUANTIZE = ("none", "int8", "int8-encoder", "auto")


class ConfigError(ValueError):
    """A config file or override is invalid; the message names the key and what was expected."""


@dataclass(frozen=True)
class ManifestConfig:
    # rows per shard: each shard becomes one file transcripts/shard-NNNNN.parquet and one record shards/NNNNN.json
    shard_size: int = 256
    # manifest field holding the row id (default: file stem + "-" + 8 hex of a hash of path and offset)
    id_field: str = "id"
    # manifest field holding the audio path or URI (relative paths resolve against the manifest's folder)
    audio_field: str = "audio_filepath"
    # manifest field holding the reference transcript (the `reference` column, used by `evaluate`)
    text_field: str = "text"
    # file extensions taken as audio when INPUT is a folder or a glob
    audio_extensions: tuple[str, ...] = (".wav", ".flac", ".mp3", ".m4a", ".ogg", ".opus", ".webm", ".mp4", ".aac")


@dataclass(frozen=True)
class AudioConfig:
    # decoded audio is resampled to this rate; fixed at 16000 for Whisper's features
    sample_rate: int = SAMPLE_RATE
    # longest window fed to the model, seconds; Whisper's encoder sees 30 s
    max_window_seconds: float = 30.0
    # long audio is cut at the quietest point within this many seconds before each window end
    cut_search_seconds: float = 5.0
    # a file whose decode takes longer than this becomes an error row ("timeout: ...")
    decode_timeout_seconds: float = 300.0
    # rows at most this long are packed several to a 30 s window, silence between them (0 disables)
    pack_max_seconds: float = 0.0
    # seconds of silence between the rows packed into one window
    pack_gap_seconds: float = 2.0
    # long files are decoded in chunks of this many seconds to bound worker memory
    streaming_chunk_seconds: float = 600.0
    # cut audio at the speech Silero VAD finds (pip install 'whisper-batch[vad]'): windows of at most
    # max_window_seconds around speech, non-speech never sent to the model, segment times absolute. Off by default
    # (see docs/accuracy.md, VAD, for when it helps)
    vad: bool = False
    # speech probability above which a 32 ms frame is speech
    vad_threshold: float = 0.5
    # speech segments at most this many seconds apart share a window; a longer pause starts a new one
    vad_merge_gap_seconds: float = 2.0
    # seconds of audio kept before and after each speech segment
    vad_pad_seconds: float = 0.4
    # files a feature actor fetches ahead of its decoder, so per-object latency (tens of ms on object stores)
    # overlaps instead of adding up; 0: fetch each file when its turn comes
    prefetch: int = 8
    # a prefetched file larger than this many MB is not kept but streamed (prefetch holds at most prefetch x this)
    prefetch_max_mb: float = 16.0


@dataclass(frozen=True)
class ModelConfig:
    # model name, local path or URI of a checkpoint; null uses the packaged tiny.en
    name: str | None = None
    # auto picks cuda when available, else cpu; or cpu, cuda, cuda:1
    device: str = "auto"
    # auto is float16 on cuda; on cpu bfloat16 where the CPU has native bf16 (AVX512-BF16/AMX), else float32
    # (float32 with quantize: int8); or float32, float16, bfloat16
    dtype: str = "auto"
    # 30 s windows per forward pass (windows from many files are batched together); 0 = as many as the free GPU
    # memory holds (16 on cpu). A batch that runs out of memory is halved and retried, and the smaller size kept.
    batch_size: int = 16
    # none; int8: dynamic int8 quantisation of the linear layers (cpu): with dtype auto the rest runs in
    # float32, with dtype bfloat16 in bf16 (attention included; the vocabulary projection then stays bf16);
    # int8-encoder: the encoder's linear layers only (the decoder keeps the model's dtype); or auto: int8-encoder on a
    # CPU without native bf16 (1.13x fp32 there, accuracy kept on every yardstick set; not the default: two long-form
    # tests lost a word or a segment's end, docs/accuracy.md)
    quantize: str = "none"
    # compile the int8 layers' input quantisation and rescale into one loop each (torch.compile, cached on disk per
    # node); where compiling fails the same operators run eagerly, with a warning
    compile: bool = True
    # a batch of windows that takes longer than this many seconds becomes error rows ("timeout: ...")
    timeout_seconds: float = 900.0


@dataclass(frozen=True)
class DecodeConfig:
    # transcribe (speech language) or translate (to English)
    task: str = "transcribe"
    # language code such as en; null detects it per window (multilingual models); a file's is its windows' most common
    language: str | None = None
    # null decodes greedily at temperature 0; an int is the beam width
    beam_size: int | None = None
    # beam search patience (null = 1.0, as in the paper)
    patience: float | None = None
    # null ranks beams by sum log-prob / length; a float uses Google NMT's length penalty
    length_penalty: float | None = None
    # temperatures tried in order; the next is used when a window fails the thresholds below. The reference goes on
    # to 0.6, 0.8 and 1.0 (configs/reference.yaml); windows failing at 0.4 are mostly noise, music or loops, whose
    # text hotter samples seldom fix, and they took most of the fallback's time (docs/performance.md)
    temperatures: tuple[float, ...] = (0.0, 0.2, 0.4)
    # gzip compression ratio above which a window is re-decoded (too repetitive)
    compression_ratio_threshold: float | None = 2.4
    # average log-prob below which a window is re-decoded
    logprob_threshold: float | None = -1.0
    # no-speech probability above which a window with log-prob below logprob_threshold (any when null) is silence
    no_speech_threshold: float | None = 0.6
    # a window that failed at every temperature is silence when its no-speech probability is above this (tones, hum)
    failed_no_speech_threshold: float | None = 0.5
    # a window whose loudest log10 mel power is below this is silence without running the model (digital silence
    # is -10; speech peaking at -60 dBFS reaches about -4.6); a pass's leading second or more of it is skipped
    quiet_log_mel: float | None = -6.0
    # greedy/sampled rows (not beam search) stop once their text cannot pass compression_ratio_threshold (a loop)
    stop_loops: bool = True
    # each window's encoder pass is its audio plus at least this many seconds of silence, rounded up to a whole
    # padding_step_seconds (at most 30, as whisper.cpp's audio_ctx), so a 6 s utterance costs a 15 s pass; accuracy
    # kept on every set of the yardstick with tiny.en (docs/accuracy.md). null pads every window to 30 s, as the
    # model was trained and the reference does (configs/reference.yaml)
    padding_seconds: float | None = 5.0
    # with padding_seconds, each encoder pass is rounded up to a multiple of this many seconds (at least 0.02: one
    # encoder position). 1 (configs/cpu-fast.yaml): 7 % less encoder work at steady state, accuracy kept on every
    # yardstick set but a little lower than with 5 on most (docs/accuracy.md)
    padding_step_seconds: float = 5.0
    # after a pass that ends at a lone timestamp before its window does, the rest is decoded once more at the first
    # temperature and kept when its average log-prob is at least this (no-speech prob <= 0.3). null (the default)
    # skips the rest as the reference does: with the default's short passes every yardstick set's text is the same
    # without probes, but telephone-8k's, where they had added words (docs/accuracy.md); with 30 s passes
    # (configs/reference.yaml: -0.7) they keep speech after music or a pause at a window's end
    probe_logprob_threshold: float | None = None
    # decode each file's windows in order, each prompted with the file's text so far (the reference's
    # condition_on_previous_text); windows of many files still share batches, one window per file at a time
    condition_on_previous_text: bool = False
    # a segment whose first word (timed by the alignment heads) starts this many seconds after its own start
    # timestamp, with sound between, follows speech the model skipped: that speech is decoded again; null: no check
    skip_seconds: float | None = 2.0
    # decode text only, without timestamp tokens (segments then span whole windows)
    without_timestamps: bool = False
    # the first timestamp token may not be later than this many seconds
    max_initial_timestamp: float | None = 1.0
    # comma-separated token ids to suppress; "-1" means Whisper's default non-speech symbols
    suppress_tokens: str = "-1"
    # suppress a blank or end-of-text first token (as the reference does)
    suppress_blank: bool = True
    # candidates sampled per window at temperatures above 0 (the fallback)
    best_of: int | None = 5
    # text given to the model as previous context (names, spellings)
    initial_prompt: str | None = None
    # word-level timestamps (cross-attention alignment)
    word_timestamps: bool = False


@dataclass(frozen=True)
class RayConfig:
    # Ray cluster address (auto, ray://host:10001); null: the cluster in RAY_ADDRESS where it is set (a Ray job's
    # driver), else a local Ray of its own, even where `ray start` left a cluster on this machine
    address: str | None = None
    # CPU actors doing audio decode + log-mel features
    cpu_actors: int = 1
    # model actors (one model copy each); 0: one per GPU, or on CPUs one per core with one torch thread each (as
    # many as half the memory holds), and never more than the run's model calls (a run of 4 rows on CPUs: one actor,
    # with every core's thread)
    model_actors: int = 0
    # GPUs per model actor; null means 1.0 when the cluster has GPUs, else 0
    gpus_per_model_actor: float | None = None
    # manifest rows (files) per model actor call; their windows are packed into model.batch_size batches.
    # 0: 64 on GPUs (fill the device); on CPUs, calls of model.batch_size windows (a long file alone, short files
    # many to a call: full decoding batches, and a shard's long files spread over the actors)
    model_batch_size: int = 0
    # a run whose graph yields nothing for this many seconds stops with an error instead of hanging
    stall_timeout_seconds: float = 1800.0
    # the most model actors the pool grows to as nodes join a running job (Ray Data autoscaling pool; it starts with
    # model_actors' count and keeps at least 1). 0: no limit, as many as the cluster's GPUs (or CPU shares) hold
    max_model_actors: int = 0
    # the most feature actors the pool grows to as nodes join; 0: cpu_actors (a fixed pool)
    max_cpu_actors: int = 0
    # after a node is lost, a run whose graph yields nothing for this many seconds stops with a message saying what
    # was lost (the same command resumes) instead of waiting for stall_timeout_seconds
    lost_node_timeout_seconds: float = 180.0
    # shards per input block of the streaming graph (a block is read, decoded and transcribed as a unit of work)
    shards_per_block: int = 1
    # "module.function" that Ray calls in every worker process as it starts (Ray's worker_process_setup_hook), e.g.
    # to set up logging; the fault tests install their hooks (pipeline/faults.py) with it. null: nothing
    worker_setup_hook: str | None = None


@dataclass(frozen=True)
class StorageConfig:
    # fsspec storage options for INPUT and OUTPUT, e.g. for s3:
    #   storage_options: {endpoint_url: http://localhost:9000, profile: myprofile}
    # Credentials here are never written to OUTPUT/run.json (they are masked); prefer a profile or env variables.
    storage_options: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class RunConfig:
    manifest: ManifestConfig = field(default_factory=ManifestConfig)
    audio: AudioConfig = field(default_factory=AudioConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    decode: DecodeConfig = field(default_factory=DecodeConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)


# section name -> its dataclass, in declaration order
SECTIONS: dict[str, type] = typing.get_type_hints(RunConfig)
# fields of these sections can change transcripts, so a resume with different values is refused
_RESULT_SECTIONS = ("model", "decode")
_RESULT_KEYS = ("audio.sample_rate", "audio.max_window_seconds", "audio.cut_search_seconds", "audio.pack_max_seconds",
                "audio.pack_gap_seconds", "audio.vad", "audio.vad_threshold", "audio.vad_merge_gap_seconds",
                "audio.vad_pad_seconds")
# model.compile: the compiled operators give the eager ones' bits (tests/unit/test_fused.py)
_NO_RESULT_KEYS = ("model.device", "model.batch_size", "model.timeout_seconds", "model.compile")
# result keys added since runs began storing them, with the value every run stored before had (so those resume)
RESULT_KEYS_ADDED = {"decode.padding_step_seconds": 5.0}


def load_config(source: str | Mapping[str, Any] | None, overrides: list[str] | tuple[str, ...] = (),
                options: Mapping[str, Any] | None = None) -> RunConfig:
    """Defaults, then ``source`` (the path of a YAML file, or a mapping of sections), then `section.key=value`
    overrides, then ``options``: Python values by :func:`option_key` name (``beam_size=5``, ``decode.beam_size=5``);
    an option and an override of the same key with different values is an error."""
    raw = config_to_dict(RunConfig())
    if isinstance(source, Mapping):
        _merge(raw, copy.deepcopy(dict(source)), where="the given config")
    elif source is not None:
        path = source
        try:
            with open(path, encoding="utf-8") as f:
                loaded = yaml.safe_load(f) or {}
        except OSError as e:
            raise ConfigError(f"cannot read config file {path!r}: {e}") from e
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {path!r} is not valid YAML: {e}") from e
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {path!r} must hold a mapping of sections, got {type(loaded).__name__}")
        _merge(raw, loaded, where=path)
    given: dict[str, Any] = {}
    for item in overrides:
        key, value = _parse_override(item)
        _merge(raw, _nest(key, value), where="--set")
        given[key] = value
    for name, value in (options or {}).items():
        key = option_key(name)
        if key in given and given[key] != value:
            raise ConfigError(f"{name}={value!r} contradicts --set {key}={given[key]!r}: give one of them")
        _merge(raw, _nest(key, value), where=name)
    return _build(raw)


# The options users know from openai-whisper's and faster-whisper's command lines, and the config keys they set
SHORTCUTS: dict[str, str] = {"model": "model.name", "language": "decode.language", "task": "decode.task",
                             "beam_size": "decode.beam_size", "word_timestamps": "decode.word_timestamps",
                             "vad": "audio.vad"}


def option_key(name: str) -> str:
    """The config key a keyword option names: a shortcut (:data:`SHORTCUTS`), ``section.field`` or ``section__field``,
    or a field name that a single section has (``cpu_actors`` is ``ray.cpu_actors``).

    Raises:
        ConfigError: the name is none of these; the message lists the valid names.
    """
    if name in SHORTCUTS:
        return SHORTCUTS[name]
    dotted = name.replace("__", ".")
    section, _, key = dotted.partition(".")
    if section in SECTIONS and key in {f.name for f in dataclasses.fields(SECTIONS[section])}:
        return dotted
    owners = [s for s, cls in SECTIONS.items() if name in {f.name for f in dataclasses.fields(cls)}]
    if len(owners) == 1:
        return f"{owners[0]}.{name}"
    if owners:
        raise ConfigError(f"option {name!r} is a field of several sections: say which, e.g. "
                          f"{', '.join(f'{o}__{name}' for o in owners)}")
    fields = sorted({f.name for cls in SECTIONS.values() for f in dataclasses.fields(cls)} - set(SHORTCUTS))
    raise ConfigError(f"unknown option {name!r}; valid options: {', '.join(SHORTCUTS)}, any config field "
                      f"({', '.join(fields)}), or section__field")


def _parse_override(item: str) -> tuple[str, Any]:
    key, sep, text = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {item!r} must look like section.key=value (e.g. decode.beam_size=5)")
    try:
        value = yaml.safe_load(text) if text.strip() else None
    except yaml.YAMLError as e:
        raise ConfigError(f"override {item!r}: value is not a YAML scalar/list: {e}") from e
    return key.strip(), value


def _nest(dotted: str, value: Any) -> dict:
    parts = dotted.split(".")
    out: dict = {parts[-1]: value}
    for part in reversed(parts[:-1]):
        out = {part: out}
    return out


def _merge(raw: dict, new: dict, where: str) -> None:
    """Merges `new` into `raw` in place, rejecting unknown sections and keys."""
    for section, values in new.items():
        if section not in SECTIONS:
            raise ConfigError(f"{where}: unknown config section {section!r}; valid sections: {', '.join(SECTIONS)}")
        if not isinstance(values, dict):
            raise ConfigError(f"{where}: config section {section!r} must be a mapping, got {values!r}")
        valid = [f.name for f in dataclasses.fields(SECTIONS[section])]
        for key, value in values.items():
            if key not in valid:
                raise ConfigError(
                    f"{where}: unknown config key '{section}.{key}'; valid keys in '{section}': {', '.join(valid)}"
                )
            if section == "storage" and key == "storage_options" and isinstance(value, dict):
                # free-form fsspec options: `--set storage.storage_options.endpoint_url=...` adds one entry
                raw[section][key] = {**(raw[section][key] or {}), **value}
            else:
                raw[section][key] = value


def _build(raw: dict) -> RunConfig:
    sections = {}
    for name, cls in SECTIONS.items():
        hints = typing.get_type_hints(cls)
        values = {key: _convert(f"{name}.{key}", value, hints[key]) for key, value in raw[name].items()}
        sections[name] = cls(**values)
    cfg = RunConfig(**sections)
    _validate(cfg)
    return cfg


def _convert(key: str, value: Any, hint: Any) -> Any:
    """Checks/converts one value to the type hint `hint`; raises ConfigError naming `key`."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        try:
            return _convert(key, value, inner[0])
        except ConfigError as e:
            raise ConfigError(f"{e} (null is allowed too)") from None
    if origin is tuple:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            value = [value]  # a single temperature is a one-element schedule
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key '{key}' must be a list, got {value!r}")
        return tuple(_convert(f"{key}[{i}]", v, args[0]) for i, v in enumerate(value))
    if origin is dict or hint is dict:
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{key}' must be a mapping, got {value!r}")
        return dict(value)
    if hint is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if hint is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if hint is bool and isinstance(value, bool):
        return value
    if hint is str and isinstance(value, str):
        return value
    if hint is str and key == "decode.suppress_tokens" and isinstance(value, (int, list)):
        return ",".join(str(v) for v in (value if isinstance(value, list) else [value]))
    raise ConfigError(f"config key '{key}' must be {getattr(hint, '__name__', hint)}, got {value!r}")


def _validate(cfg: RunConfig) -> None:
    checks = [
        (cfg.manifest.shard_size >= 1, "manifest.shard_size must be >= 1"),
        (cfg.audio.sample_rate == SAMPLE_RATE, f"audio.sample_rate is fixed at {SAMPLE_RATE} (Whisper's features)"),
        (0 < cfg.audio.max_window_seconds <= 30.0, "audio.max_window_seconds must be in (0, 30]"),
        (cfg.audio.cut_search_seconds >= 0, "audio.cut_search_seconds must be >= 0"),
        (cfg.audio.decode_timeout_seconds > 0, "audio.decode_timeout_seconds must be > 0"),
        (cfg.audio.streaming_chunk_seconds > 0, "audio.streaming_chunk_seconds must be > 0"),
        (0 < cfg.audio.vad_threshold < 1, "audio.vad_threshold must be in (0, 1)"),
        (cfg.audio.vad_merge_gap_seconds >= 0 and cfg.audio.vad_pad_seconds >= 0,
         "audio.vad_merge_gap_seconds and audio.vad_pad_seconds must be >= 0"),
        (cfg.audio.prefetch >= 0, "audio.prefetch must be >= 0 (0: no prefetch)"),
        (cfg.audio.prefetch_max_mb > 0, "audio.prefetch_max_mb must be > 0"),
        (cfg.model.dtype in DTYPES, f"model.dtype must be one of {', '.join(DTYPES)}; got {cfg.model.dtype!r}"),
        (cfg.model.quantize in QUANTIZE, f"model.quantize must be one of {', '.join(QUANTIZE)}"),
        (re.fullmatch(r"auto|cpu|cuda(:\d+)?|mps", cfg.model.device) is not None,
         f"model.device must be auto, cpu, cuda or cuda:N; got {cfg.model.device!r}"),
        (cfg.model.batch_size >= 0, "model.batch_size must be >= 1, or 0 for as many as free GPU memory holds"),
        (cfg.decode.padding_seconds is None or cfg.decode.padding_seconds >= 0,
         "decode.padding_seconds must be null (pad every window to 30 s) or >= 0"),
        (0.02 <= cfg.decode.padding_step_seconds <= 30,
         "decode.padding_step_seconds must be between 0.02 (one encoder position) and 30"),
        (cfg.decode.task in TASKS, f"decode.task must be one of {', '.join(TASKS)}"),
        (cfg.decode.beam_size is None or cfg.decode.beam_size >= 1, "decode.beam_size must be None or >= 1"),
        (len(cfg.decode.temperatures) > 0, "decode.temperatures must not be empty"),
        (all(t >= 0 for t in cfg.decode.temperatures), "decode.temperatures must be >= 0"),
        (cfg.ray.cpu_actors >= 1, "ray.cpu_actors must be >= 1"),
        (cfg.ray.model_actors >= 0, "ray.model_actors must be >= 1, or 0 for one per GPU or CPU core"),
        (cfg.ray.gpus_per_model_actor is None or cfg.ray.gpus_per_model_actor >= 0,
         "ray.gpus_per_model_actor must be None or >= 0"),
        (cfg.ray.model_batch_size >= 0,
         "ray.model_batch_size must be >= 1, or 0 for 64 rows on GPUs and calls of model.batch_size windows on CPUs"),
        (cfg.ray.shards_per_block >= 1, "ray.shards_per_block must be >= 1"),
        (cfg.ray.max_model_actors >= 0, "ray.max_model_actors must be >= 1, or 0 for no limit"),
        (cfg.ray.max_cpu_actors >= 0, "ray.max_cpu_actors must be >= 1, or 0 for ray.cpu_actors"),
        (cfg.ray.lost_node_timeout_seconds > 0, "ray.lost_node_timeout_seconds must be > 0"),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)


def config_to_dict(cfg: RunConfig) -> dict[str, dict[str, Any]]:
    """Plain nested dict (tuples become lists) for JSON/YAML."""
    out = dataclasses.asdict(cfg)
    for section in out.values():
        for key, value in section.items():
            if isinstance(value, tuple):
                section[key] = list(value)
    return out


def config_fingerprint_fields(cfg: RunConfig) -> dict[str, Any]:
    """The flat `section.key -> value` subset that changes transcripts (model, decoding, audio windowing)."""
    flat = {f"{s}.{k}": v for s, values in config_to_dict(cfg).items() for k, v in values.items()}
    fields = {
        key: value
        for key, value in flat.items()
        if (key.split(".")[0] in _RESULT_SECTIONS or key in _RESULT_KEYS) and key not in _NO_RESULT_KEYS
    }
    if fields["decode.padding_seconds"] is None:  # every pass 30 s: the step changes nothing
        del fields["decode.padding_step_seconds"]
    return fields


def redacted(cfg: RunConfig) -> dict[str, dict[str, Any]]:
    """`config_to_dict(cfg)` with secrets in storage options (keys, tokens, passwords in URLs) masked as "***"."""
    out = config_to_dict(cfg)
    out["storage"]["storage_options"] = redact_options(out["storage"]["storage_options"])
    if out["ray"]["address"]:
        out["ray"]["address"] = redact_uri(out["ray"]["address"])
    return out
