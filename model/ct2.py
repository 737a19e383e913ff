"""CTranslate2 Whisper ``model.bin``: a reader (no ctranslate2 needed) and the renaming to reference names.

Layout (little-endian): ``u32`` binary version; from version 2 the spec name and a ``u32`` revision; ``u32``
variable count; per variable its name, ``u8`` rank, ``u32[rank]`` shape, the dtype and byte count, then the
raw bytes; from version 3 the (alias, target) pairs. Strings are a ``u16`` length (counting a trailing NUL)
and the bytes. See /work/shared/notes/ct2-whisper-format.md.
"""

from __future__ import annotations

import os
import re
import struct
from typing import TYPE_CHECKING, BinaryIO

if TYPE_CHECKING:  # torch is imported where tensors are made: a run's driver reads headers without it
    import torch

_CT2_MAX_VERSION = 6
# torch dtype names
_CT2_DTYPES = {0: "float32", 1: "int8", 2: "int16", 3: "int32", 4: "float16", 5: "bfloat16"}
_CT2_ITEMSIZE_DTYPES = {4: "float32", 2: "int16", 1: "int8"}  # binary versions < 4
_CT2_INT16_SCALE = 1000.0  # CTranslate2's global scale for old int16 models saved without one
CONV1_WEIGHT = "encoder/conv1/weight"  # (n_audio_state, n_mels, 3): the one shape describe needs


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

    def skip(self, n: int) -> None:
        # Seeking past the end is allowed; a truncated file then fails on the next header read.
        self.f.seek(n, os.SEEK_CUR)

    def unpack(self, fmt: str, what: str) -> tuple:
        return struct.unpack("<" + fmt, self.read(struct.calcsize("<" + fmt), what))

    def string(self, what: str) -> str:
        (n,) = self.unpack("H", what)
        return bytes(self.read(n, what)).rstrip(b"\0").decode("utf-8")  # length counts a trailing NUL


def _read_ct2_header(reader: _Ct2Reader) -> int:
    """Reads the binary version and spec name; returns the version."""
    (version,) = reader.unpack("I", "binary version")
    if not 1 <= version <= _CT2_MAX_VERSION:
        raise ValueError(f"{reader.path}: unsupported CTranslate2 binary version {version} (this reader knows 1..6)")
    if version >= 2:
        spec = reader.string("spec name")
        reader.unpack("I", "spec revision")
        if spec != "WhisperSpec":
            raise ValueError(f"{reader.path}: a CTranslate2 {spec!r} model, expected 'WhisperSpec'")
    return version


def _read_variable_header(reader: _Ct2Reader, version: int) -> tuple[str, tuple[int, ...], str, int]:
    """Reads one variable's header: (name, shape, torch dtype name, byte count); its data follows."""
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
        raise ValueError(f"{reader.path}: variable {name} has an unknown CTranslate2 dtype")
    return name, shape, dtype, nbytes


def read_ct2_variables(path: str) -> dict[str, torch.Tensor]:
    """Reads every variable of a CTranslate2 ``model.bin``: aliases resolved, int8/int16 dequantized."""
    import torch

    variables: dict[str, torch.Tensor] = {}
    with open(path, "rb") as f:
        reader = _Ct2Reader(f, path)
        version = _read_ct2_header(reader)
        (count,) = reader.unpack("I", "variable count")
        for _ in range(count):
            name, shape, dtype_name, nbytes = _read_variable_header(reader, version)
            data = reader.read(nbytes, f"variable {name}")
            dtype = getattr(torch, dtype_name)
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


def read_ct2_n_mels(path: str) -> int:
    """The mel bins of a CTranslate2 ``model.bin`` from the variable headers alone.

    Seeks over every variable's data and stops at ``encoder/conv1/weight``, so describing a 3 GB
    large-v3 reads a few kilobytes.
    """
    with open(path, "rb") as f:
        reader = _Ct2Reader(f, path)
        version = _read_ct2_header(reader)
        (count,) = reader.unpack("I", "variable count")
        for _ in range(count):
            name, shape, _, nbytes = _read_variable_header(reader, version)
            if name == CONV1_WEIGHT:
                if len(shape) != 3:
                    raise ValueError(f"{path}: {CONV1_WEIGHT} has shape {list(shape)}, expected (d, n_mels, 3)")
                return int(shape[1])
            reader.skip(nbytes)
    raise ValueError(f"{path}: no variable {CONV1_WEIGHT}; not a Whisper model.bin")


def _dequantize(variables: dict[str, torch.Tensor], path: str) -> dict[str, torch.Tensor]:
    """Turns int8/int16 weights back to float32 with their ``<name>_scale``: value = q / scale."""
    import torch

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


def read_ct2_model(model_bin: str) -> tuple[dict[str, torch.Tensor], int, int]:
    """Reads ``model.bin`` into reference-named weights; returns (state dict, n_audio_head, n_text_head)."""
    variables = read_ct2_variables(model_bin)
    heads = []
    for side in ("encoder", "decoder"):
        if f"{side}/num_heads" not in variables:
            raise ValueError(f"{model_bin}: variable {side}/num_heads is missing; not a Whisper model.bin")
        heads.append(int(variables[f"{side}/num_heads"]))
    return ct2_to_reference(variables, model_bin), heads[0], heads[1]
