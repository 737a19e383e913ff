"""Whisper tokenizer on top of a Hugging Face ``tokenizer.json`` (byte-level BPE).

Behaves like the reference ``whisper.tokenizer.Tokenizer`` (tiktoken-based): same special-token ids,
same ``encode``/``decode`` results and the same ``non_speech_tokens``. Timestamp tokens are not stored
in CTranslate2's ``tokenizer.json``: they are the 1501 ids right after ``<|notimestamps|>``, one per
0.02 s from 0.00 to 30.00 s.
"""

from __future__ import annotations

import string
from collections.abc import Iterable, Sequence
from functools import cached_property

import tokenizers

from .constants import TASKS, TIME_PRECISION

N_TIMESTAMPS = 1501  # <|0.00|> .. <|30.00|>
MULTILINGUAL_MIN_VOCAB = 51865
# Scripts written without spaces between words: split words at unicode-point boundaries instead.
UNSEGMENTED_LANGUAGES = frozenset({"zh", "ja", "th", "lo", "my", "yue"})
REPLACEMENT_CHAR = "\ufffd"
# Hugging Face vocabularies still spell Hebrew with the old ISO code; whisper says "he".
LEGACY_LANGUAGE_CODES = {"iw": "he"}


def _byte_decoder() -> dict[str, int]:
    """Inverse of GPT-2's ``bytes_to_unicode``: the printable character that stands for each byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {chr(b): b for b in printable}
    extra = 0
    for b in range(256):
        if b not in printable:
            table[chr(256 + extra)] = b
            extra += 1
    return table


class Tokenizer:
    """Whisper's tokens: text BPE, special tokens, language tokens and timestamps.

    Args:
        hf: a ``tokenizers.Tokenizer`` loaded from a Whisper ``tokenizer.json``.
        n_vocab: the checkpoint's vocabulary size (text + specials + 1501 timestamps).
        multilingual: whether the model is multilingual; derived from ``n_vocab`` when None.
        path: where ``hf`` came from, for error messages.
    """

    def __init__(
        self,
        hf: tokenizers.Tokenizer,
        n_vocab: int,
        multilingual: bool | None = None,
        path: str | None = None,
    ) -> None:
        self._hf = hf
        self.path = path or "<in-memory tokenizer>"
        self.n_vocab = n_vocab
        self.multilingual = n_vocab >= MULTILINGUAL_MIN_VOCAB if multilingual is None else multilingual
        self.eot = self._special("<|endoftext|>")
        self.sot = self._special("<|startoftranscript|>")
        self.translate = self._special("<|translate|>")
        self.transcribe = self._special("<|transcribe|>")
        self.sot_lm = self._special("<|startoflm|>")
        self.sot_prev = self._special("<|startofprev|>")
        self.no_timestamps = self._special("<|notimestamps|>")
        # Newer vocabularies call it <|nospeech|>; the older one (tiny.en's) <|nocaptions|>.
        self.no_speech: int | None = hf.token_to_id("<|nospeech|>")
        if self.no_speech is None:
            self.no_speech = hf.token_to_id("<|nocaptions|>")
        self.timestamp_begin = self.no_timestamps + 1
        # Whisper always splits text with GPT-2's regex before BPE, whatever tokenizer.json says.
        self._pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        self._byte_of = _byte_decoder()
        self._bpe_cache: dict[str, tuple[int, ...]] = {}
        self.all_language_tokens, self.all_language_codes = self._read_languages()
        self.check_vocab(n_vocab)

    @classmethod
    def from_file(cls, path: str, n_vocab: int, multilingual: bool | None = None) -> Tokenizer:
        """Loads ``tokenizer.json`` at ``path`` for a checkpoint with ``n_vocab`` tokens."""
        try:
            hf = tokenizers.Tokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises a bare Exception on bad JSON
            raise ValueError(f"{path}: not a readable tokenizer.json ({e})") from e
        return cls(hf, n_vocab, multilingual, path=str(path))

    def _special(self, token: str) -> int:
        token_id = self._hf.token_to_id(token)
        if token_id is None:
            raise ValueError(f"{self.path}: not a Whisper tokenizer, special token {token} is missing")
        return token_id

    def _read_languages(self) -> tuple[tuple[int, ...], tuple[str, ...]]:
        # Language tokens sit between <|startoftranscript|> and <|translate|>, in id order.
        # English-only vocabularies keep the list too; `multilingual` says whether to use it.
        ids = tuple(range(self.sot + 1, self.translate))
        codes = []
        for token_id in ids:
            token = self._hf.id_to_token(token_id) or ""
            if not (token.startswith("<|") and token.endswith("|>")):
                raise ValueError(f"{self.path}: expected a language token at id {token_id}, found {token!r}")
            code = token[2:-2]
            codes.append(LEGACY_LANGUAGE_CODES.get(code, code))
        return ids, tuple(codes)

    def check_vocab(self, n_vocab: int, path: str | None = None) -> None:
        """Raises ValueError unless text tokens + 1501 timestamps add up to the checkpoint's ``n_vocab``."""
        expected = self.timestamp_begin + N_TIMESTAMPS
        if expected != n_vocab:
            raise ValueError(
                f"tokenizer does not match checkpoint: {path or self.path} has {self.timestamp_begin} tokens "
                f"before the timestamps, so {expected} with the {N_TIMESTAMPS} timestamps, but the "
                f"checkpoint's n_vocab is {n_vocab}"
            )

    @property
    def num_languages(self) -> int:
        return len(self.all_language_tokens)

    # -- special-token sequences -------------------------------------------------------------------

    def language_token(self, code: str) -> int:
        """Token id of language ``code`` (e.g. "en"); ValueError listing the valid codes if unknown."""
        try:
            code = code.lower()
            return self.all_language_tokens[self.all_language_codes.index(LEGACY_LANGUAGE_CODES.get(code, code))]
        except ValueError:
            valid = ", ".join(self.all_language_codes)
            raise ValueError(f"unknown language {code!r}; this tokenizer knows: {valid}") from None

    def sot_sequence(self, language: str | None = None, task: str | None = "transcribe") -> tuple[int, ...]:
        """The decoder prompt: ``(sot, language, task)`` when multilingual, ``(sot,)`` for English-only.

        English-only models take no language or task tokens, so both arguments are ignored there
        (whisper does the same). A multilingual call with ``language=None`` leaves the language out.
        """
        if task is not None and task not in TASKS:
            raise ValueError(f"unknown task {task!r}; expected one of {TASKS}")
        if not self.multilingual:
            return (self.sot,)
        sequence = [self.sot]
        if language is not None:
            sequence.append(self.language_token(language))
        if task is not None:
            sequence.append(self.transcribe if task == "transcribe" else self.translate)
        return tuple(sequence)

    def sot_sequence_including_notimestamps(
        self, language: str | None = None, task: str | None = "transcribe"
    ) -> tuple[int, ...]:
        return (*self.sot_sequence(language, task), self.no_timestamps)

    # -- text <-> ids --------------------------------------------------------------------------------

    def encode(self, text: str) -> list[int]:
        """BPE ids of ``text``, no special tokens added; ``<|...|>`` in ``text`` is plain text.

        Merges follow the token ranks (ids) the way tiktoken does, not ``tokenizer.json``'s merge
        list: the multilingual Whisper ``tokenizer.json`` lacks the first merge ("Ġ t"), so the
        ``tokenizers`` library splits every " t..." word differently from the reference.
        """
        ids: list[int] = []
        for piece, _ in self._pre_tokenizer.pre_tokenize_str(text):
            cached = self._bpe_cache.get(piece)
            if cached is None:
                if len(self._bpe_cache) > 100_000:
                    self._bpe_cache.clear()
                cached = self._bpe_cache[piece] = self._bpe(bytes(self._byte_of[c] for c in piece))
            ids.extend(cached)
        return ids

    def _bpe(self, piece: bytes) -> tuple[int, ...]:
        """Merges the adjacent pair whose concatenation has the lowest rank, leftmost first, until none is a token."""
        ranks = self._ranks
        if piece in ranks:
            return (ranks[piece],)
        parts = [piece[i : i + 1] for i in range(len(piece))]
        while len(parts) > 1:
            best_rank, best = None, -1
            for i in range(len(parts) - 1):
                rank = ranks.get(parts[i] + parts[i + 1])
                if rank is not None and (best_rank is None or rank < best_rank):
                    best_rank, best = rank, i
            if best < 0:
                break
            parts[best : best + 2] = [parts[best] + parts[best + 1]]
        return tuple(ranks[p] for p in parts)

    @cached_property
    def _ranks(self) -> dict[bytes, int]:
        # Text tokens only (ids below <|endoftext|>): their ids are the BPE ranks.
        return {b: i for i, b in enumerate(self._token_bytes[: self.eot]) if b}

    @cached_property
    def _token_bytes(self) -> list[bytes]:
        # Decoding works on bytes, as tiktoken does, so that partial UTF-8 sequences become U+FFFD
        # exactly where the reference puts them (split_to_word_tokens depends on it).
        table = [b""] * self.timestamp_begin
        for token, token_id in self._hf.get_vocab(with_added_tokens=False).items():
            if token_id < self.timestamp_begin:
                table[token_id] = bytes(self._byte_of[c] for c in token)
        for token_id, added in self._hf.get_added_tokens_decoder().items():
            if token_id < self.timestamp_begin:
                table[token_id] = added.content.encode("utf-8")
        return table

    def _bytes(self, token: int) -> bytes:
        if token >= self.timestamp_begin:
            return f"<|{(token - self.timestamp_begin) * TIME_PRECISION:.2f}|>".encode()
        return self._token_bytes[token]

    def decode(self, tokens: Iterable[int]) -> str:
        """Text of ``tokens``; timestamp tokens are dropped, other specials render as ``<|...|>``."""
        data = b"".join(self._token_bytes[t] for t in map(int, tokens) if t < self.timestamp_begin)
        return data.decode("utf-8", errors="replace")

    def decode_with_timestamps(self, tokens: Iterable[int]) -> str:
        """Like ``decode`` but renders timestamp tokens, e.g. ``<|1.08|>``."""
        return b"".join(self._bytes(t) for t in map(int, tokens)).decode("utf-8", errors="replace")

    # -- suppression and word splitting ------------------------------------------------------------

    @cached_property
    def non_speech_tokens(self) -> tuple[int, ...]:
        """Tokens to suppress so the model does not write speaker tags or ``♪``/``(NOISE)`` annotations.

        Basic punctuation (, . ? !) stays allowed; hyphen and apostrophe are only suppressed at the
        start of a word.
        """
        symbols = list('"#()*+/:;<=>@[\\]^_`{|}~「」『』')
        symbols += "<< >> <<< >>> -- --- -( -[ (' (\" (( )) ((( ))) [[ ]] {{ }} ♪♪ ♪♪♪".split()
        # U+2640..U+267F symbols share their first two UTF-8 bytes, so when one is several tokens
        # suppressing its first token is enough and harmless.
        musical = set("♩♪♫♬♭♮♯")
        result = {self.encode(" -")[0], self.encode(" '")[0]}
        for symbol in symbols + sorted(musical):
            for ids in (self.encode(symbol), self.encode(" " + symbol)):
                if len(ids) == 1 or symbol in musical:
                    result.add(ids[0])
        return tuple(sorted(result))

    def split_to_word_tokens(
        self, tokens: Sequence[int], language: str | None = None
    ) -> tuple[list[str], list[list[int]]]:
        """Groups ``tokens`` into words: at spaces/punctuation, or at unicode points for zh/ja/th/lo/my/yue."""
        if language in UNSEGMENTED_LANGUAGES:
            return self.split_tokens_on_unicode(tokens)
        return self.split_tokens_on_spaces(tokens)

    def split_tokens_on_unicode(self, tokens: Sequence[int]) -> tuple[list[str], list[list[int]]]:
        """Groups ``tokens`` into the shortest runs that decode to whole unicode characters."""
        full = self.decode_with_timestamps(tokens)
        words: list[str] = []
        groups: list[list[int]] = []
        current: list[int] = []
        offset = 0  # characters of `full` consumed by the finished groups
        for token in tokens:
            current.append(token)
            text = self.decode_with_timestamps(current)
            bad = text.find(REPLACEMENT_CHAR)
            # A U+FFFD means an incomplete UTF-8 sequence, unless the full text has a real U+FFFD there.
            if bad < 0 or full[offset + bad] == REPLACEMENT_CHAR:
                words.append(text)
                groups.append(current)
                current = []
                offset += len(text)
        return words, groups

    def split_tokens_on_spaces(self, tokens: Sequence[int]) -> tuple[list[str], list[list[int]]]:
        """Groups ``tokens`` into words that start at a space, a punctuation mark or a special token."""
        words: list[str] = []
        groups: list[list[int]] = []
        for text, ids in zip(*self.split_tokens_on_unicode(tokens)):
            # `"" in string.punctuation` is True, so whitespace-only pieces start a word, as in whisper.
            starts_word = ids[0] >= self.eot or text.startswith(" ") or text.strip() in string.punctuation
            if starts_word or not words:
                words.append(text)
                groups.append(ids)
            else:
                words[-1] += text
                groups[-1].extend(ids)
        return words, groups
