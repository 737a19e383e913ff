"""Config: defaults, YAML + overrides, clear errors for unknown keys and bad types, redaction."""

import dataclasses
import json
from pathlib import Path

import pytest

from tests.config_yaml import base_yaml, field_comments, yaml_value
from whisper_batch.pipeline.config import (
    SECTIONS,
    ConfigError,
    RunConfig,
    config_fingerprint_fields,
    config_to_dict,
    load_config,
    redacted,
)

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def test_defaults():
    cfg = load_config(None, [])
    assert cfg == RunConfig()
    assert cfg.manifest.shard_size == 256
    assert cfg.model.name is None and cfg.model.batch_size == 16 and cfg.model.dtype == "auto"
    assert cfg.decode.beam_size is None
    assert cfg.decode.temperatures == (0.0, 0.2, 0.4) and cfg.decode.padding_seconds == 5.0
    reference = load_config(str(CONFIGS / "reference.yaml"))  # the reference's windows, for parity checks
    assert reference.decode.temperatures == (0.0, 0.2, 0.4, 0.6, 0.8, 1.0) and reference.decode.padding_seconds is None
    assert cfg.decode.compression_ratio_threshold == 2.4
    assert cfg.audio.sample_rate == 16000 and cfg.audio.max_window_seconds == 30.0
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.decode.beam_size = 5


def test_base_yaml_is_written_from_the_field_comments():
    # every field, its default and the comment above it in pipeline/config.py (which has one for every field)
    text = base_yaml()
    assert (CONFIGS / "base.yaml").read_text(encoding="utf-8") == text, (
        "configs/base.yaml differs from pipeline/config.py: `python -m tests.config_yaml` rewrites it")
    assert load_config(str(CONFIGS / "base.yaml")) == RunConfig()
    comments = field_comments()
    for section, values in config_to_dict(RunConfig()).items():
        for key in values:
            assert f"\n  {key}: " in text and comments[SECTIONS[section].__name__][key], f"{section}.{key}"


def test_base_yaml_marks_the_fields_that_change_results():
    lines = base_yaml().splitlines()
    results = set(config_fingerprint_fields(RunConfig()))
    section = None
    for i, line in enumerate(lines):
        if not line.startswith((" ", "#")) and line.endswith(":"):
            section = line[:-1]
            marked_section = lines[i - 1] == f"# every {section} field is (results)"
        elif line.startswith("  ") and not line.startswith("  #"):
            key = f"{section}.{line.split(':')[0].strip()}"
            first = i
            while lines[first - 1].startswith("  #"):
                first -= 1
            marked = marked_section or lines[first].startswith("  # (results) ")
            assert marked == (key in results), key


def test_base_yaml_values_read_back_as_written():
    assert yaml_value(None) == "null" and yaml_value(True) == "true" and yaml_value(30.0) == "30.0"
    assert yaml_value("-1") == '"-1"' and yaml_value("auto") == "auto" and yaml_value("") == '""'
    assert yaml_value((0.0, 0.2)) == "[0.0, 0.2]" and yaml_value({}) == "{}"
    assert yaml_value(["yes", "null", "1.5"]) == '["yes", "null", "1.5"]'


@pytest.mark.parametrize("name", ["cpu-tiny.yaml", "cpu-fast.yaml", "reference.yaml", "gpu-large-v3.yaml"])
def test_shipped_configs_load(name):
    cfg = load_config(str(CONFIGS / name))
    assert cfg != RunConfig()


def test_gpu_config_values():
    cfg = load_config(str(CONFIGS / "gpu-large-v3.yaml"))
    assert cfg.model.name == "large-v3" and cfg.model.dtype == "float16"
    # batches sized from the GPU's free memory, and enough files per call to fill them
    assert cfg.ray.gpus_per_model_actor == 1.0 and cfg.model.batch_size == 0
    assert cfg.ray.model_batch_size > RunConfig().ray.model_batch_size


def test_yaml_then_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("decode:\n  beam_size: 3\n  language: en\nmanifest:\n  shard_size: 10\n")
    cfg = load_config(str(path), ["decode.beam_size=5", "decode.temperatures=[0.0, 0.5]", "model.name=null"])
    assert cfg.decode.beam_size == 5  # override wins over the file
    assert cfg.decode.language == "en" and cfg.manifest.shard_size == 10
    assert cfg.decode.temperatures == (0.0, 0.5)
    assert cfg.model.name is None


def test_override_value_conversion():
    cfg = load_config(None, ["decode.temperatures=0", "decode.patience=2", "decode.suppress_tokens=-1",
                             "model.quantize=none", "decode.without_timestamps=true"])
    assert cfg.decode.temperatures == (0.0,)
    assert cfg.decode.patience == 2.0 and isinstance(cfg.decode.patience, float)
    assert cfg.decode.suppress_tokens == "-1"
    assert cfg.model.quantize == "none"
    assert cfg.decode.without_timestamps is True


def test_unknown_key_names_it_and_lists_valid_keys():
    with pytest.raises(ConfigError) as err:
        load_config(None, ["decode.beam_sze=5"])
    message = str(err.value)
    assert "unknown config key 'decode.beam_sze'" in message
    assert "valid keys in 'decode'" in message and "beam_size" in message and "temperatures" in message


def test_unknown_key_in_yaml_names_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  nmae: x\n")
    with pytest.raises(ConfigError, match=r"c\.yaml.*unknown config key 'model\.nmae'"):
        load_config(str(path))


def test_unknown_section():
    with pytest.raises(ConfigError, match="unknown config section 'decoder'.*decode"):
        load_config(None, ["decoder.beam_size=5"])


@pytest.mark.parametrize(
    "override, match",
    [
        ("decode.beam_size=abc", "'decode.beam_size' must be int"),
        ("decode.beam_size=2.5", "'decode.beam_size' must be int"),
        ("manifest.shard_size=true", "'manifest.shard_size' must be int"),
        ("decode.without_timestamps=3", "'decode.without_timestamps' must be bool"),
        ("decode.temperatures=[0.0, hot]", r"'decode.temperatures\[1\]' must be float"),
        ("model.dtype=fp8", "model.dtype must be one of"),
        ("manifest.shard_size=0", "shard_size must be >= 1"),
        ("decode.padding_step_seconds=0", r"padding_step_seconds must be between 0.02 \(one encoder position\)"),
        ("audio.sample_rate=8000", "sample_rate is fixed"),
        ("decode.beam_size", "must look like section.key=value"),
    ],
)
def test_bad_values(override, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, [override])


def test_storage_options_overrides_merge():
    cfg = load_config(None, ["storage.storage_options.endpoint_url=http://localhost:9000",
                             "storage.storage_options.anon=false"])
    assert cfg.storage.storage_options == {"endpoint_url": "http://localhost:9000", "anon": False}


def test_a_mapping_is_a_config_source():
    cfg = load_config({"decode": {"beam_size": 5}, "ray": {"cpu_actors": 2}}, ["decode.beam_size=3"])
    assert (cfg.decode.beam_size, cfg.ray.cpu_actors) == (3, 2)
    with pytest.raises(ConfigError, match="nope"):
        load_config({"decode": {"nope": 1}})


def test_redaction_masks_secrets():
    cfg = load_config(None, [
        "storage.storage_options={key: AKIA123, secret: s3cr3t, token: tok, profile: prod, "
        "endpoint_url: 'http://user:pw@minio:9000', client_kwargs: {aws_secret_access_key: zzz, region_name: eu}}",
    ])
    out = redacted(cfg)
    dumped = json.dumps(out)
    for secret in ("AKIA123", "s3cr3t", "tok\"", "pw@", "zzz"):
        assert secret not in dumped
    options = out["storage"]["storage_options"]
    assert options["profile"] == "prod" and options["client_kwargs"]["region_name"] == "eu"
    assert options["endpoint_url"] == "http://user:***@minio:9000"
    assert cfg.storage.storage_options["key"] == "AKIA123"  # the config itself is untouched


def test_fingerprint_fields_cover_results_only():
    base = config_fingerprint_fields(RunConfig())
    assert "decode.beam_size" in base and "model.name" in base and "audio.max_window_seconds" in base
    assert not any(k.startswith(("ray.", "storage.", "manifest.")) for k in base)
    assert "model.batch_size" not in base and "model.device" not in base
    assert config_fingerprint_fields(load_config(None, ["ray.model_actors=8", "model.batch_size=64"])) == base
    assert config_fingerprint_fields(load_config(None, ["decode.beam_size=5"])) != base
    json.dumps(base)  # stored in run.json
