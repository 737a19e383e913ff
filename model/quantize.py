"""Dynamic int8 quantisation of the Linear layers, for CPU inference.

The attention and MLP projections, and the output projection onto the vocabulary (tied to the token embedding in
the checkpoint — the largest matmul of every decoding step), run as int8 GEMMs with per-row weight scales;
activations are quantised on the fly. Convolutions, layer norms and attention itself stay in fp32.
"""

from __future__ import annotations

import torch
from torch import nn

from .whisper import Linear, Whisper


def _plain_linear(layer: Linear) -> nn.Linear:
    plain = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None)
    plain.load_state_dict(layer.state_dict())
    return plain


def quantize_int8(model: Whisper) -> Whisper:
    """Quantise ``model`` (fp32, CPU) in place and return it."""
    if model.dtype != torch.float32 or model.device.type != "cpu":
        raise ValueError("int8 quantisation is for fp32 models on the CPU")
    # torch's dynamic quantizer maps nn.Linear exactly; ours only adds a dtype cast, which fp32 does not need
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if type(child) is Linear:
                setattr(module, name, _plain_linear(child))
    d = model.dims
    proj = nn.Linear(d.n_text_state, d.n_vocab, bias=False)
    proj.weight = nn.Parameter(model.decoder.token_embedding.weight.detach().clone())
    model.decoder.out_proj = proj
    # one scale per output row (per-channel): a per-tensor scale is set by the largest weight of the whole matrix
    qconfig = torch.ao.quantization.per_channel_dynamic_qconfig
    torch.ao.quantization.quantize_dynamic(model, {nn.Linear: qconfig}, dtype=torch.qint8, inplace=True)
    return model
