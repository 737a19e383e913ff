"""Hugging Face transformers Whisper directories: weights (safetensors, sharded or not) to reference names."""

from __future__ import annotations

import json
import os
import pickle
import re
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported where tensors are read: a run's driver reads config.json without it
    import torch

# Hugging Face module names (after "model.") -> reference names.
_HF_LAYER_MODULES = {
    "self_attn.q_proj": "attn.query",
    "self_attn.k_proj": "attn.key",
    "self_attn.v_proj": "attn.value",
    "self_attn.out_proj": "attn.out",
    "self_attn_layer_norm": "attn_ln",
    "encoder_attn.q_proj": "cross_attn.query",
    "encoder_attn.k_proj": "cross_attn.key",
    "encoder_attn.v_proj": "cross_attn.value",
    "encoder_attn.out_proj": "cross_attn.out",
    "encoder_attn_layer_norm": "cross_attn_ln",
    "fc1": "mlp.0",
    "fc2": "mlp.2",
    "final_layer_norm": "mlp_ln",
}
_HF_TOP = {
    "encoder.embed_positions.weight": "encoder.positional_embedding",
    "encoder.layer_norm.weight": "encoder.ln_post.weight",
    "encoder.layer_norm.bias": "encoder.ln_post.bias",
    "decoder.embed_tokens.weight": "decoder.token_embedding.weight",
    "decoder.embed_positions.weight": "decoder.positional_embedding",
    "decoder.layer_norm.weight": "decoder.ln.weight",
    "decoder.layer_norm.bias": "decoder.ln.bias",
}
_HF_LAYER_RE = re.compile(r"^(encoder|decoder)\.layers\.(\d+)\.(.+)\.(weight|bias)$")
_HF_DEFAULT_N_MELS = 80  # transformers' WhisperConfig default, used when config.json omits num_mel_bins


def read_json(path: str) -> dict:
    """The JSON object at ``path``, or ``{}`` when there is no such file (optional side files)."""
    if not os.path.isfile(path):
        return {}
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def hf_to_reference(hf: dict[str, torch.Tensor], path: str) -> dict[str, torch.Tensor]:
    """Renames a transformers ``WhisperForConditionalGeneration``/``WhisperModel`` state dict."""
    sd, unknown = {}, []
    for name, value in hf.items():
        key = name.removeprefix("model.")
        if key == "proj_out.weight":
            continue  # tied to decoder.embed_tokens
        match = _HF_LAYER_RE.match(key)
        if match and match.group(3) in _HF_LAYER_MODULES:
            side, index, module, param = match.groups()
            if module.endswith("k_proj") and param == "bias":
                continue  # no key bias in the reference; a constant one cancels in the softmax
            sd[f"{side}.blocks.{index}.{_HF_LAYER_MODULES[module]}.{param}"] = value
        elif key in _HF_TOP:
            sd[_HF_TOP[key]] = value
        elif re.match(r"^encoder\.conv[12]\.(weight|bias)$", key):
            sd[key] = value
        else:
            unknown.append(name)
    if unknown:
        raise ValueError(f"{path}: unexpected tensors for a Hugging Face Whisper model: {unknown[:5]}")
    return sd


def _read_hf_weights(model_dir: str) -> dict[str, torch.Tensor]:
    """The raw (transformers-named) tensors: model.safetensors, its sharded index, or pytorch_model.bin."""
    from safetensors.torch import load_file

    single = os.path.join(model_dir, "model.safetensors")
    if os.path.isfile(single):
        return load_file(single)
    index = os.path.join(model_dir, "model.safetensors.index.json")
    if os.path.isfile(index):
        weights = {}
        for shard in sorted(set(read_json(index)["weight_map"].values())):
            weights.update(load_file(os.path.join(model_dir, shard)))
        return weights
    legacy = os.path.join(model_dir, "pytorch_model.bin")
    if os.path.isfile(legacy):
        return safe_torch_load(legacy)
    raise ValueError(f"{model_dir}: Hugging Face Whisper directory without model.safetensors or pytorch_model.bin")


def safe_torch_load(path: str, mmap: bool = False) -> dict[str, torch.Tensor]:
    """``torch.load`` that refuses pickles carrying code; ``mmap`` maps tensor data instead of reading it."""
    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        if "weights only load failed" in str(e).lower():
            raise ValueError(
                f"{path}: not a safe checkpoint: its pickle needs code to load, which is refused "
                f"(only tensors, dicts, lists and plain values are accepted)"
            ) from e
        raise ValueError(f"{path}: not a readable torch checkpoint ({e})") from e


def check_hf_weights(model_dir: str) -> None:
    """Raises ValueError when the directory has no weights, or only a ``pytorch_model.bin`` whose pickle carries
    code. Reads no tensor data (safetensors are safe by construction; a zip pickle is memory-mapped), so the
    driver can refuse such a checkpoint before any work."""
    if any(os.path.isfile(os.path.join(model_dir, n)) for n in ("model.safetensors", "model.safetensors.index.json")):
        return
    legacy = os.path.join(model_dir, "pytorch_model.bin")
    if not os.path.isfile(legacy):
        raise ValueError(f"{model_dir}: Hugging Face Whisper directory without model.safetensors or pytorch_model.bin")
    with open(legacy, "rb") as f:
        zipped = f.read(4) == b"PK\x03\x04"  # torch.save's zip format can be mapped; a bare pickle is read
    safe_torch_load(legacy, mmap=zipped)


def read_hf_model(model_dir: str) -> tuple[dict[str, torch.Tensor], int, int]:
    """Reads a transformers Whisper directory; returns (reference state dict, n_audio_head, n_text_head)."""
    config = read_json(os.path.join(model_dir, "config.json"))
    heads = [config.get(key) for key in ("encoder_attention_heads", "decoder_attention_heads")]
    if None in heads:
        raise ValueError(f"{model_dir}/config.json: needs encoder_attention_heads and decoder_attention_heads")
    return hf_to_reference(_read_hf_weights(model_dir), model_dir), int(heads[0]), int(heads[1])


def read_hf_n_mels(model_dir: str) -> int:
    """The mel bins from ``config.json`` alone (``num_mel_bins``), without touching the weights."""
    config = read_json(os.path.join(model_dir, "config.json"))
    return int(config.get("num_mel_bins", _HF_DEFAULT_N_MELS))
