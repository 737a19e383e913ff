"""Batched decoding of 30 s windows that may come from many files: greedy, sampling (best-of) and beam search.

The reference ``DecodingTask`` is kept in spirit — logit filters, a token decoder, a sequence ranker — but every
rule works on the whole batch at once, the kv-cache is explicit (:class:`~whisper_batch.model.kv_cache.KVCache`), and
an audio leaves the active batch as soon as its result is fixed, so its cost stops. Results equal the reference's
``whisper.decode``.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from .constants import CHUNK_LENGTH, TASKS
from .kv_cache import every_run
from .tokenizer import Tokenizer
from .whisper import Whisper


@dataclass(frozen=True)
class DecodingOptions:
    # "transcribe" (speech -> same-language text) or "translate" (speech -> English)
    task: str = "transcribe"
    # language of the audio; None: detected per window on multilingual models, "en" on English-only models
    language: str | None = None
    # 0.0 decodes greedily (or by beam search); above 0 samples from the softmax at that temperature
    temperature: float = 0.0
    # most tokens to sample per window (default: half the text context, 224)
    sample_len: int | None = None
    # candidates sampled per window when temperature > 0
    best_of: int | None = None
    # beams per window when temperature == 0; None decodes greedily
    beam_size: int | None = None
    # beam search stops once round(beam_size * patience) finished candidates exist (arXiv:2204.05424)
    patience: float | None = None
    # None ranks candidates by their summed logprob / length; a value alpha uses Google NMT's ((5+len)/6)**alpha
    length_penalty: float | None = None
    # text or tokens of a previous context, fed after <|startofprev|>
    prompt: str | Sequence[int] | None = None
    # comma-separated ids or a list to suppress; "-1" means the non-speech symbols
    suppress_tokens: str | Sequence[int] | None = "-1"
    # no blank or end-of-text as the first sampled token
    suppress_blank: bool = True
    # sample text tokens only (<|notimestamps|>)
    without_timestamps: bool = False
    # the first timestamp may not be later than this many seconds
    max_initial_timestamp: float | None = 1.0
    # stop sampling a row (greedy or best-of) whose text so far compresses better than this: it is looping, and
    # would fail transcribe's compression check anyway — without this a loop runs on to sample_len tokens
    stop_compression_ratio: float | None = None

    def validate(self) -> None:
        if self.task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, got {self.task!r}")
        if self.beam_size is not None and self.best_of is not None:
            raise ValueError("beam_size and best_of can't be given together")
        if self.temperature == 0 and self.best_of is not None:
            raise ValueError("best_of with greedy sampling (temperature 0) is not compatible")
        if self.patience is not None and self.beam_size is None:
            raise ValueError("patience requires beam_size to be given")
        if self.length_penalty is not None and not 0 <= self.length_penalty <= 1:
            raise ValueError("length_penalty (alpha) should be a value between 0 and 1")


@dataclass
class DecodingResult:
    """One window's decoded result."""

    tokens: list[int]  # sampled tokens: text and timestamps, no <|endoftext|>
    text: str
    language: str
    avg_logprob: float
    no_speech_prob: float
    temperature: float
    compression_ratio: float
    language_probs: dict[str, float] | None = None


def compression_ratio(text: str) -> float:
    data = text.encode("utf-8")
    return len(data) / len(zlib.compress(data)) if data else 0.0


class LoopStop:
    """Which rows to stop: those whose text so far compresses better than ``threshold`` (a loop)."""

    every = 8  # steps between checks
    min_tokens = 32  # shorter texts do not compress well whatever they hold

    def __init__(self, tokenizer: Tokenizer, sample_begin: int, threshold: float):
        self.tokenizer, self.sample_begin, self.threshold = tokenizer, sample_begin, threshold

    def __call__(self, tokens: Tensor, length: int) -> list[int]:
        if length - self.sample_begin < self.min_tokens or (length - self.sample_begin) % self.every:
            return []
        eot, rows = self.tokenizer.eot, []
        for row, seq in enumerate(tokens[:, self.sample_begin : length].tolist()):
            if eot in seq:
                continue  # finished
            text = self.tokenizer.decode([t for t in seq if t < eot])
            if compression_ratio(text) > self.threshold:
                rows.append(row)
        return rows


@torch.no_grad()
def detect_language(
    model: Whisper, tokenizer: Tokenizer, audio_features: Tensor, lengths: Sequence[int] | None = None
) -> tuple[list[str], list[dict[str, float]]]:
    """Most likely language per window, from the logits after <|startoftranscript|>. audio_features: (n, S, C);
    ``lengths``: per window its real encoder positions (windows of several lengths, zero-padded to S)."""
    if not tokenizer.multilingual:
        raise ValueError("this model is English-only: it has no language tokens to detect with")
    lang_tokens = torch.tensor(tokenizer.all_language_tokens[: model.num_languages], device=audio_features.device)
    codes = tokenizer.all_language_codes[: model.num_languages]
    sot = torch.full((audio_features.shape[0], 1), tokenizer.sot, device=audio_features.device)
    runs = every_run(lengths, audio_features.shape[0], audio_features.shape[1])
    logits = torch.cat([model.logits(sot[a:b], audio_features[a:b, :n])[:, 0] for a, b, n in runs])
    probs = logits.index_select(-1, lang_tokens).softmax(-1).cpu()
    best = probs.argmax(-1).tolist()
    return [codes[i] for i in best], [dict(zip(codes, p.tolist())) for p in probs]


def suppressed_tokens(tokenizer: Tokenizer, spec: str | Sequence[int] | None) -> list[int]:
    """The ids never sampled: the given list ("-1" adds the non-speech symbols) plus the task/control tokens."""
    if not spec:  # as the reference: no suppress list, no suppression at all (control tokens included)
        return []
    if isinstance(spec, str):
        spec = [int(t) for t in spec.split(",") if t.strip()]
    ids = [t for t in (spec or []) if t >= 0]
    if spec and -1 in spec:
        ids.extend(tokenizer.non_speech_tokens)
    ids.extend([tokenizer.transcribe, tokenizer.translate, tokenizer.sot, tokenizer.sot_prev, tokenizer.sot_lm])
    if tokenizer.no_speech is not None:
        ids.append(tokenizer.no_speech)
    return sorted(set(ids))


class LogitRules:
    """Suppress-blank, suppress-tokens and the timestamp rules over the whole batch.

    Token suppression is one index fill; the timestamp rules come down to at most two ranges of ids per row, filled
    as slices, so a step costs no (rows, vocab)-sized masks.
    """

    def __init__(
        self, tokenizer: Tokenizer, options: DecodingOptions, sample_begin: int, n_vocab: int, n_audio_ctx: int, device
    ):
        self.tk = tokenizer
        self.sample_begin = sample_begin
        self.timestamps = not options.without_timestamps
        suppress = suppressed_tokens(tokenizer, options.suppress_tokens)
        if self.timestamps and tokenizer.no_timestamps is not None:
            suppress.append(tokenizer.no_timestamps)
        self.suppress = torch.tensor(sorted(set(suppress)), dtype=torch.long, device=device)
        first = torch.zeros(n_vocab, dtype=torch.bool)  # extra ids forbidden as the first sampled token
        if options.suppress_blank:
            first[tokenizer.encode(" ") + [tokenizer.eot]] = True
        if self.timestamps:
            first[: tokenizer.timestamp_begin] = True  # the first token is a timestamp
            if options.max_initial_timestamp:
                precision = CHUNK_LENGTH / n_audio_ctx  # seconds per timestamp step (0.02)
                last_allowed = tokenizer.timestamp_begin + round(options.max_initial_timestamp / precision)
                first[last_allowed + 1 :] = True
        self.first = first.nonzero().flatten().to(device)

    def apply(self, logits: Tensor, tokens: Tensor) -> Tensor | None:
        """logits (rows, V) of the next token, modified in place; tokens (rows, T) decoded so far.

        Returns the log-softmax of the modified logits where the timestamp rules computed it (for the search to
        reuse: a pass over (rows, vocab) costs about as much as a decoder layer), else None.
        """
        neg_inf = float("-inf")
        logits.index_fill_(1, self.suppress, neg_inf)
        if tokens.shape[1] == self.sample_begin:
            logits.index_fill_(1, self.first, neg_inf)
        if not self.timestamps:
            return None
        tb = self.tk.timestamp_begin
        for row, ranges in enumerate(self.timestamp_ranges(tokens[:, self.sample_begin :])):
            for lo, hi in ranges:
                logits[row, lo:hi] = neg_inf
        # if the summed probability of the timestamps beats every text token, sample a timestamp
        logprobs = F.log_softmax(logits.float(), dim=-1)
        ts_logprob = logprobs[:, tb:].logsumexp(dim=-1)
        text_max = logprobs[:, :tb].amax(dim=-1)  # max(dim) also finds the indices: 10x slower
        rows = (ts_logprob > text_max).nonzero().flatten().tolist()
        for row in rows:  # a row at a time: few rows a step, where a masked fill costs a pass over them all
            logits[row, :tb] = neg_inf
        if rows:  # row by row, log_softmax gives the bits it gives over the whole batch
            logprobs[rows] = F.log_softmax(logits[rows].float(), dim=-1)
        return logprobs

    def timestamp_ranges(self, sampled: Tensor) -> list[list[tuple[int, int | None]]]:
        """Per row, the id ranges the timestamp rules forbid next: timestamps come in pairs (except before EOT) and
        never decrease. sampled: (rows, n) tokens after the prompt."""
        rows, n = sampled.shape
        if n == 0:
            return [[] for _ in range(rows)]
        tb, eot = self.tk.timestamp_begin, self.tk.eot
        # timestamps are non-decreasing, so the latest is the largest
        latest = torch.where(sampled >= tb, sampled, -1).max(dim=1).values
        last2 = sampled[:, -2:] if n >= 2 else torch.cat([torch.full_like(sampled, tb), sampled], dim=1)
        out = []
        for (penult, last), top in zip(last2.tolist(), latest.tolist()):
            last_ts, penult_ts = last >= tb, penult >= tb
            ranges = []
            if last_ts and penult_ts:  # a pair just closed: text (or EOT) next
                ranges.append((tb, None))
            elif last_ts:  # an open pair: no text; a timestamp not before the last, or EOT
                ranges.append((0, eot))
            if top >= 0 and not (last_ts and penult_ts):
                ranges.append((tb, top if last_ts and not penult_ts else top + 1))  # a closed pair moves forward
            out.append(ranges)
        return out


def rank(candidates: list[list[int]], scores: list[float], length_penalty: float | None) -> int:
    """Index of the best candidate by summed logprob over a length penalty (the reference's ranker)."""
    best, best_score = 0, float("-inf")
    for i, (tokens, logprob) in enumerate(zip(candidates, scores)):
        n = len(tokens)
        penalty = n if length_penalty is None else ((5 + n) / 6) ** length_penalty
        score = logprob / penalty if penalty else float("-inf")
        if score > best_score:
            best, best_score = i, score
    return best


def initial_tokens(
    tokenizer: Tokenizer,
    options: DecodingOptions,
    language: str | None,
    n_text_ctx: int,
    prompt: str | Sequence[int] | None = None,
) -> list[int]:
    """[<|startofprev|> prompt…] <|startoftranscript|> [<|lang|> <|task|>] [<|notimestamps|>]; ``prompt``, when
    given, instead of ``options.prompt``."""
    tokens = list(tokenizer.sot_sequence(language, options.task))
    if options.without_timestamps:
        tokens.append(tokenizer.no_timestamps)
    prompt = options.prompt if prompt is None else prompt
    if prompt:
        tokens = [tokenizer.sot_prev] + prompt_tokens(tokenizer, prompt)[-(n_text_ctx // 2 - 1) :] + tokens
    return tokens


def prompt_tokens(tokenizer: Tokenizer, prompt: str | Sequence[int] | None) -> list[int]:
    """A prompt's tokens: text is encoded after a space, as the reference does; tokens are taken as they are."""
    if not prompt:
        return []
    return tokenizer.encode(" " + prompt.strip()) if isinstance(prompt, str) else list(prompt)


def resolve_languages(
    model: Whisper,
    tokenizer: Tokenizer,
    audio_features: Tensor,
    options: DecodingOptions,
    languages: Sequence[str | None] | None,
    lengths: Sequence[int] | None = None,
) -> tuple[list[str], list[dict[str, float] | None]]:
    """Per window: the given language, else the option's, else (multilingual models) the detected one."""
    n = audio_features.shape[0]
    wanted = list(languages) if languages is not None else [None] * n
    if len(wanted) != n:
        raise ValueError(f"{len(wanted)} languages given for {n} windows")
    if not tokenizer.multilingual:
        return ["en"] * n, [None] * n
    langs = [lang or options.language for lang in wanted]
    probs: list[dict[str, float] | None] = [None] * n
    unknown = [i for i, lang in enumerate(langs) if lang is None]
    if unknown:
        sub = [lengths[i] for i in unknown] if lengths is not None else None
        detected, detected_probs = detect_language(model, tokenizer, audio_features[unknown], sub)
        for i, lang, p in zip(unknown, detected, detected_probs):
            langs[i], probs[i] = lang, p
    return langs, probs


@torch.no_grad()
def decode(
    model: Whisper,
    tokenizer: Tokenizer,
    audio_features: Tensor,
    options: DecodingOptions = DecodingOptions(),
    languages: Sequence[str | None] | None = None,
    prompts: Sequence[Sequence[int] | None] | None = None,
    lengths: Sequence[int] | None = None,
) -> list[DecodingResult]:
    """Decode a batch of windows at one temperature.

    Args:
        audio_features: encoder output (n_windows, n_audio_ctx, n_audio_state) — see ``Whisper.embed_audio``.
        languages: optional per-window language codes (None entries are detected on multilingual models).
        prompts: optional per-window prompt tokens (the previous windows' text), in place of ``options.prompt``
            where not None; windows with shorter prompts are left-padded, and no real position sees the padding.
        lengths: optional per-window encoder positions, where windows encoded at several lengths share the batch
            (their features zero-padded to the longest): each window attends to its own positions only, as alone.
    """
    from .search import BeamSearch, Sampler, run_search

    options.validate()
    n_ctx = model.dims.n_text_ctx
    lengths = list(lengths) if lengths is not None else None
    langs, lang_probs = resolve_languages(model, tokenizer, audio_features, options, languages, lengths)
    if prompts is not None and len(prompts) != len(langs):
        raise ValueError(f"{len(prompts)} prompts given for {len(langs)} windows")
    initial = [initial_tokens(tokenizer, options, lang, n_ctx, prompts[i] if prompts else None)
               for i, lang in enumerate(langs)]
    begin = max(len(t) for t in initial)
    pad = torch.tensor([begin - len(t) for t in initial], dtype=torch.long)
    initial = [[tokenizer.eot] * (begin - len(t)) + t for t in initial]  # the padding's tokens are never seen
    sample_begin = len(initial[0])
    sot_index = initial[0].index(tokenizer.sot)
    sample_len = options.sample_len or n_ctx // 2
    rules = LogitRules(
        tokenizer, options, sample_begin, model.dims.n_vocab, model.dims.n_audio_ctx, audio_features.device
    )
    if options.beam_size is not None and options.temperature == 0:
        search = BeamSearch(tokenizer.eot, options.beam_size, options.patience, sample_begin, len(initial))
    else:
        search = Sampler(tokenizer.eot, options.best_of or 1, options.temperature, sample_begin)
    initial_t = torch.tensor(initial, dtype=torch.long, device=audio_features.device)
    stop = None
    if options.stop_compression_ratio is not None and isinstance(search, Sampler):
        stop = LoopStop(tokenizer, sample_begin, options.stop_compression_ratio)
    found = run_search(
        model, audio_features, initial_t, search, rules, sample_len, sot_index, tokenizer.no_speech, stop, pad, lengths
    )

    results = []
    for cands, lang, probs in zip(found, langs, lang_probs):
        best = rank(cands.tokens, cands.sum_logprobs, options.length_penalty)
        tokens = cands.tokens[best]
        text = tokenizer.decode(tokens).strip()
        results.append(
            DecodingResult(
                tokens=tokens,
                text=text,
                language=lang,
                avg_logprob=cands.sum_logprobs[best] / (len(tokens) + 1),
                no_speech_prob=cands.no_speech_prob,
                temperature=options.temperature,
                compression_ratio=compression_ratio(text),
                language_probs=probs,
            )
        )
    return results
