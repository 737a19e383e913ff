"""The yardstick's paired statistics on small fixed examples whose numbers can be checked by hand, and the set
builder's noise at its stated SNR."""

import numpy as np
import pytest

from benchmarks.make_yardstick import add_noise
from benchmarks.yardstick import paired_compare, row_errors


def test_paired_counts_and_wers_by_hand():
    # 4 rows of 10 words: reference 0+2+1+0 = 3 errors (7.5 %), candidate 1+0+1+0 = 2 (5 %)
    p = paired_compare([0, 2, 1, 0], [1, 0, 1, 0], [10, 10, 10, 10], samples=500, seed=1)
    assert p["rows"] == 4 and p["words"] == 40
    assert p["ref_wer"] == pytest.approx(0.075) and p["cand_wer"] == pytest.approx(0.05)
    assert p["diff"] == pytest.approx(-0.025)
    assert (p["better"], p["worse"], p["same"]) == (1, 1, 2)
    lo, hi = p["ci"]
    # a resample's difference is (cand - ref errors) / words, each row adding +1, -2, 0 or 0 over 10 words:
    # it lies in [-2/10, +1/10]; both directions occur, so the interval straddles zero and accuracy is kept
    assert -0.2 <= lo < 0 < hi <= 0.1
    assert p["keeps"]


def test_a_constant_shift_gives_a_point_interval():
    # every row has exactly one more error in the candidate, 10 words each: every resample differs by 1/10
    p = paired_compare([0, 1, 2, 3, 0], [1, 2, 3, 4, 1], [10] * 5)
    assert p["ci"] == pytest.approx((0.1, 0.1))
    assert (p["better"], p["worse"]) == (0, 5)
    assert not p["keeps"]  # the interval lies above zero: the candidate is worse
    same = paired_compare([3, 1, 0], [3, 1, 0], [7, 9, 4])
    assert same["ci"] == (0.0, 0.0) and same["keeps"] and same["same"] == 3


def test_the_interval_is_reproducible_and_weights_rows_by_words():
    ref, cand, words = [0, 5, 1, 2, 0, 3], [1, 3, 1, 2, 2, 3], [5, 40, 8, 12, 6, 20]
    a, b = paired_compare(ref, cand, words, seed=7), paired_compare(ref, cand, words, seed=7)
    assert a["ci"] == b["ci"]
    # corpus WER is total errors over total words, not a mean of row rates: (1+3+1+2+2+3) / 91
    assert a["cand_wer"] == pytest.approx(12 / 91) and a["ref_wer"] == pytest.approx(11 / 91)
    assert a["ci"][0] <= a["diff"] <= a["ci"][1]


def test_bad_input():
    with pytest.raises(ValueError):
        paired_compare([1, 2], [1], [3, 3])
    with pytest.raises(ValueError):
        paired_compare([], [], [])


def test_row_errors_counts_substitutions_deletions_insertions():
    errors, words = row_errors(["a b c d", "x y"], ["a c d e f", "x y"])  # -b, +e +f: 3 errors over 4 words
    assert errors.tolist() == [3, 0] and words.tolist() == [4, 2]


def test_noise_is_added_at_the_stated_snr_and_is_seeded():
    t = np.arange(16000) / 16000
    speech = (0.1 * np.sin(2 * np.pi * 220 * t)).astype(np.float32)
    noisy = add_noise(speech, 10.0, seed=3)
    noise = noisy - speech
    snr = 10 * np.log10(np.mean(speech.astype(np.float64) ** 2) / np.mean(noise.astype(np.float64) ** 2))
    assert snr == pytest.approx(10.0, abs=0.05)
    assert np.array_equal(noisy, add_noise(speech, 10.0, seed=3))
    assert not np.array_equal(noisy, add_noise(speech, 10.0, seed=4))


def test_configurations_by_name_or_overrides_always_with_the_fp32_reference():
    from benchmarks.yardstick import parse_configs
    from whisper_batch.pipeline.config import load_config

    reference = load_config(None, parse_configs("int8")["fp32"])  # fp32 with the reference's windows and fallback
    assert (reference.model.dtype, reference.model.quantize, reference.decode.padding_seconds) == ("float32", "none",
                                                                                                 None)
    assert reference.decode.temperatures == (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)
    assert parse_configs("int8")["int8"] == ["model.quantize=int8"]
    custom = parse_configs("default,pad10:decode.padding_seconds=10+decode.beam_size=5")
    assert list(custom) == ["fp32", "default", "pad10"]
    assert custom["pad10"] == ["decode.padding_seconds=10", "decode.beam_size=5"] and custom["default"] == []
    with pytest.raises(ValueError, match="unknown configuration"):
        parse_configs("fp16")


def test_bench_needs_a_manifest_unless_yardstick():
    from click.testing import CliRunner

    from benchmarks.bench import cli

    result = CliRunner().invoke(cli, [])
    assert result.exit_code == 2 and "MANIFEST is required (or --yardstick)" in result.output


@pytest.mark.parametrize("name", ["cpu-fast", "reference"])
def test_a_named_configuration_is_the_shipped_file(tmp_path, name):
    """The yardstick's "cpu-fast" and "reference" judge exactly the files in configs/: their fields as overrides
    give the file's config."""
    from pathlib import Path

    from benchmarks.yardstick import CONFIGS, file_overrides
    from whisper_batch.pipeline.config import RunConfig, load_config

    shipped = Path(__file__).resolve().parents[2] / "configs" / f"{name}.yaml"
    assert load_config(None, CONFIGS[name]) == load_config(str(shipped)) != RunConfig()
    other = tmp_path / "c.yaml"
    other.write_text("decode:\n  temperatures: [0.0, 0.5]\n  language: en\nmodel:\n  dtype: float32\n")
    assert file_overrides(other) == ['decode.temperatures=[0.0, 0.5]', 'decode.language="en"',
                                     "model.dtype=\"float32\""]
    assert load_config(None, file_overrides(other)) == load_config(str(other))


def test_the_bench_counts_lost_sentences_beside_its_wer():
    """bench's score: a row missing 6 consecutive reference words is a deletion run, scattered errors are not."""
    from benchmarks.bench import format_table, score

    rows = [{"id": "a", "reference": "red green blue cyan magenta yellow black white grey brown"},
            {"id": "b", "reference": "alpha beta gamma delta epsilon zeta eta theta"}]
    result = {"engine": "openai", "audio_s": 20.0, "load_s": 1.0, "wall_s": 2.0, "process_s": 4.0, "peak_rss_mb": 300,
              "texts": {"a": "red green blue cyan", "b": "alpha beta gamma dealt a epsilon zeta eta theta"}}
    s = score(result, rows)
    assert s["deletion_runs"] == 1  # "magenta ... brown" lost; b's substitution and insertion are no run
    assert s["wer"] == pytest.approx((6 + 2) / 18)
    # start-up: the process without the peer's model work (the wall s), 2 of its 4 s; steady: 20 s of audio in 2 s
    assert "| openai | 20.0 | 1.0 | 2.0 | 10.0 | 4.0 | 5.0 | 50.0 | 10.0 | 44.44 | 1 | 300 |" in format_table([s])
    # ours: the run's seconds before its first model call are start-up too
    ours = score({**result, "engine": "whisper-batch", "first_call_s": 0.5}, rows)
    assert ours["startup_s"] == pytest.approx(2.5) and ours["steady_rtfx"] == pytest.approx(20 / 1.5)


def test_a_bench_engine_of_ours_takes_candidate_settings():
    from benchmarks.bench import our_settings

    assert our_settings("whisper-batch-fast:model.quantize=int8+model.dtype=bfloat16") == (
        "cpu-fast.yaml", ["model.quantize=int8", "model.dtype=bfloat16"])
    assert our_settings("whisper-batch-reference") == ("reference.yaml", [])
    assert our_settings("faster-batched-int8") is None and our_settings("faster-batched-int8:x=1") is None
