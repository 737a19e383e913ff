"""Token search over a batch: sampling (greedy when the temperature is 0, best-of otherwise) and beam search.

Rows are audio-major — row ``r`` belongs to audio ``r // group`` — and an audio leaves the batch (its rows, its
cache entries) as soon as its result can no longer change.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from .kv_cache import KVCache
from .whisper import Whisper


@dataclass
class Candidates:
    """The finished sequences of one audio (sampled tokens only, EOT excluded) and their summed logprobs."""

    tokens: list[list[int]]
    sum_logprobs: list[float]
    no_speech_prob: float = float("nan")


def _trim(seq: list[int], eot: int) -> list[int]:
    return seq[: seq.index(eot)] if eot in seq else seq


def first_argmax(x: Tensor, block: int = 4096) -> Tensor:
    """``x.argmax(dim=-1)`` of a (rows, n) tensor, the same indices (the first maximum of each row), faster.

    torch's argmax over a row runs a scalar loop, about ten times slower than its vectorised ``amax`` (a tiny.en
    step's 8 x 51,864 logits: 0.24 ms): the maxima of blocks of ``block`` columns find each row's first block that
    holds its maximum, and argmax runs over that block alone.
    """
    rows, n = x.shape
    whole = n // block
    if x.device.type != "cpu" or whole < 2:
        return x.argmax(dim=-1)
    maxima = x[:, : whole * block].reshape(rows, whole, block).amax(dim=-1)
    if n > whole * block:
        maxima = torch.cat([maxima, x[:, whole * block :].amax(dim=-1, keepdim=True)], dim=1)
    start = maxima.argmax(dim=-1) * block  # ties and NaN: the first block, as argmax takes the first index
    # the last block may be short: its columns past the end repeat the last one, after it, so never first
    cols = (start[:, None] + torch.arange(block, device=x.device)).clamp_(max=n - 1)
    return start + x.gather(1, cols).argmax(dim=-1)


class Sampler:
    """``group`` independent rows per audio; argmax at temperature 0, otherwise sampling."""

    def __init__(self, eot: int, group: int, temperature: float, sample_begin: int):
        self.eot, self.group, self.temperature, self.sample_begin = eot, group, temperature, sample_begin
        self.generator = None

    def step(
        self, tokens: Tensor, length: int, logits: Tensor, sum_logprobs: Tensor, cache: KVCache,
        logprobs: Tensor | None = None,
    ) -> Tensor:
        """Write token ``length`` of every row; return which audios are done, (n_audio,) bool. ``logprobs``: the
        log-softmax of ``logits`` where the caller has it."""
        if self.generator is None and self.temperature > 0:
            self.generator = torch.Generator(device=logits.device).manual_seed(int(self.temperature * 1000))
        if self.temperature == 0:
            next_tokens = first_argmax(logits)
        else:
            # seeded: a rerun (a resumed job) samples the same fallback text for the same windows
            # inverse-CDF sampling, one uniform draw per row: multinomial draws one per vocabulary entry (51k)
            cdf = torch.softmax(logits.float() / self.temperature, dim=-1).cumsum(dim=-1)
            u = torch.rand(cdf.shape[0], 1, generator=self.generator, device=cdf.device) * cdf[:, -1:]
            next_tokens = torch.searchsorted(cdf, u, right=True).squeeze(1).clamp_(max=cdf.shape[1] - 1)
        if logprobs is None:
            logprobs = F.log_softmax(logits.float(), dim=-1)
        current = logprobs.gather(1, next_tokens[:, None]).squeeze(1)
        alive = tokens[:, length - 1] != self.eot
        sum_logprobs += torch.where(alive, current, 0.0)  # rows past EOT (or audios already finished) add nothing
        next_tokens = torch.where(alive, next_tokens, self.eot)
        tokens[:, length] = next_tokens
        return (next_tokens == self.eot).view(-1, self.group).all(dim=1)

    def finish(self, audio: int, tokens: Tensor, length: int, sum_logprobs: Tensor) -> Candidates:
        rows = slice(audio * self.group, (audio + 1) * self.group)
        seqs = [_trim(row, self.eot) for row in tokens[rows, self.sample_begin : length].tolist()]
        return Candidates(seqs, sum_logprobs[rows].tolist())

    def keep(self, audios: Tensor) -> None:
        pass


class BeamSearch:
    """Beam search vectorized over audios, with the reference's candidate order, patience and finalization."""

    def __init__(self, eot: int, beam_size: int, patience: float | None, sample_begin: int, n_audio: int):
        self.eot, self.beam, self.sample_begin = eot, beam_size, sample_begin
        self.group = beam_size
        self.max_candidates = round(beam_size * (patience or 1.0))
        if self.max_candidates <= 0:
            raise ValueError(f"beam_size * patience must give at least one candidate, got {self.max_candidates}")
        self.finished: list[dict[tuple[int, ...], float]] = [{} for _ in range(n_audio)]
        self.first = True

    def step(
        self, tokens: Tensor, length: int, logits: Tensor, sum_logprobs: Tensor, cache: KVCache,
        logprobs: Tensor | None = None,
    ) -> Tensor:
        beam, width = self.beam, self.beam + 1
        n_audio = logits.shape[0] // beam
        if logprobs is None:
            logprobs = F.log_softmax(logits.float(), dim=-1)
        top_lp, top_tok = logprobs.topk(width, dim=-1)  # (rows, beam+1)
        scores = (sum_logprobs[:, None] + top_lp).view(n_audio, beam * width)
        if self.first:  # all beams start identical: only beam 0's candidates are distinct sequences
            scores.view(n_audio, beam, width)[:, 1:] = float("-inf")
            self.first = False
        cand_tok = top_tok.view(n_audio, beam * width)
        cand_src = torch.arange(n_audio * beam, device=logits.device).repeat_interleave(width).view(n_audio, -1)
        order = scores.argsort(dim=1, descending=True, stable=True)
        scores, cand_tok, cand_src = scores.gather(1, order), cand_tok.gather(1, order), cand_src.gather(1, order)
        is_eot = cand_tok == self.eot
        kept_before = (~is_eot).cumsum(dim=1)  # non-EOT candidates up to here, in score order
        keep = ~is_eot & (kept_before <= beam)  # the best `beam` continuations per audio
        done_now = is_eot & (kept_before < beam)  # EOTs ranked above the last kept continuation
        self._collect(tokens, length, scores, cand_src, done_now)
        src = cand_src[keep]
        tokens[:, :length] = tokens[src, :length]
        tokens[:, length] = cand_tok[keep]
        sum_logprobs.copy_(scores[keep])
        cache.reorder(src)
        counts = torch.tensor([len(f) for f in self.finished], device=logits.device)
        return counts >= self.max_candidates

    def _collect(self, tokens: Tensor, length: int, scores: Tensor, src: Tensor, done_now: Tensor) -> None:
        if not done_now.any():
            return
        for audio, pos in done_now.nonzero().tolist():  # already in descending score order per audio
            finished = self.finished[audio]
            if len(finished) >= self.max_candidates:
                continue
            seq = tuple(tokens[src[audio, pos], :length].tolist()) + (self.eot,)
            finished[seq] = scores[audio, pos].item()

    def finish(self, audio: int, tokens: Tensor, length: int, sum_logprobs: Tensor) -> Candidates:
        finished = self.finished[audio]
        if len(finished) < self.beam:  # not enough finished: the live beams, best first, with an EOT
            rows = range(audio * self.beam, (audio + 1) * self.beam)
            lps = sum_logprobs[audio * self.beam : (audio + 1) * self.beam].tolist()
            for j in sorted(range(self.beam), key=lambda j: lps[j], reverse=True):
                finished[tuple(tokens[rows[j], :length].tolist()) + (self.eot,)] = lps[j]
                if len(finished) >= self.beam:
                    break
        seqs = [_trim(list(seq[self.sample_begin :]), self.eot) for seq in finished]
        return Candidates(seqs, list(finished.values()))

    def keep(self, audios: Tensor) -> None:
        self.finished = [self.finished[i] for i in audios.tolist()]


def run_search(
    model: Whisper,
    audio_features: Tensor,
    initial: Tensor,
    search: Sampler | BeamSearch,
    rules,
    sample_len: int,
    sot_index: int,
    no_speech: int | None,
    stop=None,
    pad: Tensor | None = None,
    lengths: list[int] | None = None,
) -> list[Candidates]:
    """Decode every audio of ``audio_features`` (n_audio, S, C) from its ``initial`` tokens (n_audio, L0).

    ``pad`` (n_audio,): padding tokens at the start of each audio's ``initial`` (prompts of different lengths).
    ``lengths`` (n_audio,): each audio's real encoder positions, where passes of several lengths share the batch.

    ``stop(tokens, length)``, if given, names rows to end now (their next token is forced to end-of-text).
    """
    n_audio, begin = initial.shape
    group = search.group
    max_len = begin + sample_len
    cache = model.new_cache(audio_features, group, max_len=min(max_len, model.dims.n_text_ctx), lengths=lengths)
    if pad is not None and bool(pad.any()):
        cache.pad = pad.to(initial.device).repeat_interleave(group)
    tokens = torch.empty(n_audio * group, max_len + 1, dtype=torch.long, device=initial.device)
    tokens[:, :begin] = initial.repeat_interleave(group, dim=0)
    sum_logprobs = torch.zeros(n_audio * group, device=initial.device)
    active = torch.arange(n_audio)  # original index of each audio still in the batch
    retired = torch.zeros(n_audio, dtype=torch.bool)  # finished audios still in the batch, until it is compacted
    results: list[Candidates | None] = [None] * n_audio
    no_speech_probs = [float("nan")] * n_audio
    length = begin
    # the token predicted at the last position is sampled but never fed back, as in the reference
    for step in range(min(sample_len, model.dims.n_text_ctx - begin + 1)):
        fed = tokens[:, :length] if step == 0 else tokens[:, length - 1 : length]
        logits = model.decode_step(fed, cache)
        if step == 0 and no_speech is not None:
            probs = logits[::group, sot_index].float().softmax(dim=-1)[:, no_speech]
            no_speech_probs = probs.tolist()
        logits = logits[:, -1]
        logprobs = rules.apply(logits, tokens[:, :length])
        stopped = stop(tokens, length) if stop is not None else []
        if stopped:
            logits[stopped] = float("-inf")
            logits[stopped, search.eot] = 0.0
            if logprobs is not None:
                logprobs[stopped] = F.log_softmax(logits[stopped].float(), dim=-1)
        done = search.step(tokens, length, logits, sum_logprobs, cache, logprobs).cpu()
        length += 1
        new = done & ~retired
        if not new.any():
            continue
        for audio in new.nonzero().flatten().tolist():
            results[active[audio]] = search.finish(audio, tokens, length, sum_logprobs)
        retired |= new
        if retired.all():
            break
        # finished audios leave the batch so their rows stop costing anything — once a quarter of it is finished,
        # because compacting copies every live row's cache (the cross K/V most of all)
        if 4 * int(retired.sum()) < retired.numel():
            continue
        keep = (~retired).nonzero().flatten()
        rows = (keep[:, None] * group + torch.arange(group)).flatten().to(tokens.device)
        tokens, sum_logprobs = tokens[rows], sum_logprobs[rows]
        cache.keep_audios(keep.to(tokens.device))
        search.keep(keep)
        active, retired = active[keep], retired[keep]
    for audio, original in enumerate(active.tolist()):
        if results[original] is None:
            results[original] = search.finish(audio, tokens, length, sum_logprobs)
    for original, cands in enumerate(results):
        cands.no_speech_prob = no_speech_probs[original]
    return results
