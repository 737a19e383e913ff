"""Token search (model/search.py): what greedy decoding, sampling and beam search promise.

- Greedy (temperature 0): each step takes the first maximum of the logits (``first_argmax`` gives torch's argmax,
  ties and NaN included); a row that has ended keeps <|endoftext|> and adds no logprob, as the reference's
  ``GreedyDecoder``.
- Sampling (temperature > 0, best-of): tokens follow softmax(logits / T) and never a suppressed token; the generator
  is seeded by the temperature, so a rerun samples the same.
- Beam search: the reference's candidate order, patience and finalization, so results equal ``whisper.decode``'s;
  ``beam_size * patience`` must leave at least one candidate.
- Both: an audio leaves the batch as soon as its result is fixed, and that changes nothing (a window decoded alone
  equals the same window in any batch, in any order); decoding may run up to the text context (448 positions) and
  ends there as the reference does; a row that ``stop`` names ends on a forced <|endoftext|> that adds no logprob;
  on a CUDA device (fp32) the tokens are the CPU's (``pytest -m gpu``, run by ``make gpu-check``).

Tiny random models as in test_decoding.py, whose helpers this file shares.
"""

from __future__ import annotations

import copy

import pytest
import torch

from tests.unit.test_decoding import SAMPLE_LEN, assert_same_results, features, reference_decode
from whisper_batch.model.decoding import DecodingOptions, LogitRules, decode, initial_tokens
from whisper_batch.model.search import Sampler, first_argmax, run_search

whisper = pytest.importorskip("whisper", reason="the reference openai-whisper is a test dependency")

# the reference's ranker calls np.argmax on a list, which numpy 2 warns about
pytestmark = pytest.mark.filterwarnings("ignore:__array_wrap__ must accept context:DeprecationWarning")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


# --------------------------------------------------------------------------- greedy and sampling steps


def test_first_argmax_is_argmax():
    """The blockwise argmax of greedy steps gives torch's indices: the first maximum of a row, ties, rows of -inf,
    NaN, a short last block, and rows narrower than two blocks."""
    g = torch.Generator().manual_seed(3)
    for rows, n in [(8, 51864), (3, 51865), (5, 9000), (2, 8192), (4, 5000), (1, 17)]:
        x = (torch.randn(rows, n, generator=g) * 3).to(torch.bfloat16).float()  # bf16 values: real ties
        assert torch.equal(first_argmax(x), x.argmax(dim=-1))
        x[:, ::97] = x.max()  # many tied maxima per row, the first in the first block
        x[-1, : n // 2] = float("-inf")  # the last row's maxima only in its second half
        assert torch.equal(first_argmax(x), x.argmax(dim=-1))
        x[0] = float("-inf")
        x[-1, n - 1] = float("nan")  # argmax takes NaN as the largest
        assert torch.equal(first_argmax(x), x.argmax(dim=-1))
    x = torch.zeros(2, 10000)
    x[0, 9999], x[1, 4096] = 1.0, 1.0  # in the short last block; at a block's first column
    assert first_argmax(x).tolist() == [9999, 4096]


def test_greedy_step_matches_reference_greedy_decoder(random_model, tiny_en_tokenizer):
    """Rows that already ended keep <|endoftext|> and stop adding logprobs (matters for best-of groups)."""
    eot, g = tiny_en_tokenizer.eot, torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 1000, (4, 6), generator=g)
    tokens[1, 4] = tokens[3, 4] = eot  # rows 1 and 3 ended at the previous step
    logits = torch.randn(4, 51864, generator=g)
    sum_logprobs = torch.randn(4, generator=g)
    ref_sums = sum_logprobs.clone()  # updated in place, like ours
    ref_tokens, ref_done = whisper.decoding.GreedyDecoder(0.0, eot).update(tokens[:, :5], logits, ref_sums)
    ours_sums = sum_logprobs.clone()
    done = Sampler(eot, group=2, temperature=0.0, sample_begin=1).step(tokens, 5, logits, ours_sums, cache=None)
    assert torch.equal(tokens, ref_tokens)
    torch.testing.assert_close(ours_sums, ref_sums)
    assert ours_sums[1] == sum_logprobs[1] and ours_sums[3] == sum_logprobs[3]
    assert done.tolist() == [False, False] and not ref_done  # each audio still has a live row


def test_sampling_follows_the_tempered_distribution_and_never_picks_a_suppressed_token():
    rows, eot = 20000, 4
    logits = torch.tensor([[2.0, 1.0, float("-inf"), 0.0, -1.0]]).repeat(rows, 1)
    tokens = torch.zeros(rows, 2, dtype=torch.long)
    sampler = Sampler(eot=eot, group=1, temperature=0.5, sample_begin=1)
    sampler.step(tokens, 1, logits, torch.zeros(rows), cache=None)
    freq = torch.bincount(tokens[:, 1], minlength=5).float() / rows
    want = torch.softmax(logits[0] / 0.5, dim=-1)
    assert freq[2] == 0
    assert torch.allclose(freq, want, atol=0.01), (freq, want)
    again = torch.zeros(rows, 2, dtype=torch.long)
    Sampler(eot=eot, group=1, temperature=0.5, sample_begin=1).step(again, 1, logits, torch.zeros(rows), cache=None)
    assert torch.equal(again, tokens)  # seeded by the temperature: a rerun samples the same


@torch.no_grad()
def test_a_stopped_row_ends_on_a_forced_eot_that_adds_no_logprob(random_model, tiny_en_tokenizer):
    """A row the stop names gets <|endoftext|> as its only choice: its logprob is 0, so the row's sum is that of the
    tokens before it, as a decode cut at the same length by sample_len has (the search reuses the rules'
    log-softmax, which the forced row must not keep)."""
    tk, opts = tiny_en_tokenizer, DecodingOptions(language="en")
    initial = torch.tensor([initial_tokens(tk, opts, "en", random_model.dims.n_text_ctx)] * 2)
    begin = initial.shape[1]
    feats = features(random_model, 2)
    rules = LogitRules(tk, opts, begin, random_model.dims.n_vocab, random_model.dims.n_audio_ctx, "cpu")

    def decode_rows(sample_len, stop=None):
        return run_search(random_model, feats, initial, Sampler(tk.eot, 1, 0.0, begin), rules, sample_len,
                          initial[0].tolist().index(tk.sot), tk.no_speech, stop)

    cut = decode_rows(2)
    stopped = decode_rows(SAMPLE_LEN, stop=lambda tokens, length: [0] if length == begin + 2 else [])
    assert len(cut[0].tokens[0]) == 2  # the row had not ended by itself: the stop is what ended it
    assert stopped[0].tokens == cut[0].tokens
    assert stopped[0].sum_logprobs == pytest.approx(cut[0].sum_logprobs, abs=1e-6)


# --------------------------------------------------------------------------- whole searches vs the reference


SEARCH_OPTIONS = [
    dict(),
    dict(beam_size=3),
    dict(beam_size=3, without_timestamps=True),
    dict(beam_size=2, patience=3.0, without_timestamps=True),  # patience changes 3 of the 4 windows' results here
]


@pytest.mark.parametrize("options", SEARCH_OPTIONS, ids=lambda o: ",".join(o) or "greedy")
def test_search_matches_reference(options, random_setup, reference_of):
    model, tokenizer = random_setup
    options = {"sample_len": SAMPLE_LEN, **options}
    af = features(model)
    ours = decode(model, tokenizer, af, DecodingOptions(language="en", **options))
    assert_same_results(ours, reference_decode(reference_of(model), af, language="en", **options))


@pytest.mark.parametrize("options", [dict(), dict(beam_size=2, without_timestamps=True)], ids=["greedy", "beam"])
def test_decode_up_to_the_text_context_matches_reference(options, random_model, tiny_en_tokenizer, reference_of):
    # a 223-token prompt and no <|endoftext|> allowed: decoding runs into the 448-token context
    options = dict(prompt=list(range(100, 400)), suppress_tokens=[tiny_en_tokenizer.eot], **options)
    af = features(random_model, 1)
    ours = decode(random_model, tiny_en_tokenizer, af, DecodingOptions(**options))
    ref = reference_decode(reference_of(random_model), af, language="en", **options)
    assert [len(r.tokens) for r in ours] == [len(r.tokens) for r in ref]
    assert_same_results(ours, ref)


def test_beam_without_any_candidate_is_an_error(random_model, tiny_en_tokenizer):
    with pytest.raises(ValueError, match="at least one candidate"):
        decode(random_model, tiny_en_tokenizer, features(random_model, 1), DecodingOptions(beam_size=1, patience=0.1))


# --------------------------------------------------------------------------- batch invariance


@pytest.mark.parametrize(
    "options",
    [dict(), dict(without_timestamps=True), dict(beam_size=3), dict(beam_size=3, without_timestamps=True)],
    ids=["greedy", "greedy-notimestamps", "beam3", "beam3-notimestamps"],
)
def test_window_alone_equals_window_in_batch(options, random_model, tiny_en_tokenizer):
    af = features(random_model, 6, seed=1)
    opts = DecodingOptions(sample_len=SAMPLE_LEN, **options)
    batch = decode(random_model, tiny_en_tokenizer, af, opts)
    lengths = [len(r.tokens) for r in batch]
    assert min(lengths) < 10 and max(lengths) - min(lengths) >= 10  # rows really leave the batch at different steps
    for i, r in enumerate(batch):
        alone = decode(random_model, tiny_en_tokenizer, af[i : i + 1], opts)[0]
        assert r.tokens == alone.tokens, f"window {i}"
        assert r.avg_logprob == pytest.approx(alone.avg_logprob, abs=1e-5)
        assert r.no_speech_prob == pytest.approx(alone.no_speech_prob, abs=1e-7)
    # and in another order, among other windows
    order = [5, 2, 0, 4, 1, 3]
    shuffled = decode(random_model, tiny_en_tokenizer, af[order], opts)
    assert [r.tokens for r in shuffled] == [batch[i].tokens for i in order]


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("options", [dict(), dict(beam_size=3)], ids=["greedy", "beam3"])
def test_cuda_search_gives_the_cpu_tokens(options, random_model, tiny_en_tokenizer, monkeypatch):
    """Every tensor of the search on the device (rules, argmax, beams, audios leaving the batch), fp32 without TF32:
    the CPU's tokens, and its scores up to the kernels' rounding."""
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    model = copy.deepcopy(random_model).cuda()
    af = features(random_model, 6, seed=1)
    opts = DecodingOptions(sample_len=SAMPLE_LEN, **options)
    cpu = decode(random_model, tiny_en_tokenizer, af, opts)
    cuda = decode(model, tiny_en_tokenizer, af.cuda(), opts)
    assert [r.tokens for r in cuda] == [r.tokens for r in cpu]
    for i, (a, b) in enumerate(zip(cuda, cpu)):
        assert a.avg_logprob == pytest.approx(b.avg_logprob, abs=1e-4), f"window {i}"
        assert a.no_speech_prob == pytest.approx(b.no_speech_prob, abs=1e-5), f"window {i}"
