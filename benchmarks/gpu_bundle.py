"""``python -m benchmarks.gpu_bundle``: what ``benchmarks.gpu_check`` needs on a GPU machine that lacks it.

The GPU machine this project may be lent has torch, numpy, safetensors, tokenizers, PyYAML, pyarrow, fsspec, regex and
pytest, but not Ray, PyAV, jiwer, the Whisper text normaliser or the packaged weights, and nothing can be fetched
there; what travels with one call (the working tree plus carried paths) must fit in 64 MiB. The bundle holds:

- Whisper tiny.en, the packaged CTranslate2 weights as they are (fp16, bit for bit), written as a Hugging Face
  transformers Whisper directory in two safetensors shards (``model.safetensors.index.json``), which
  ``whisper_batch.model.checkpoint.load_checkpoint`` reads as it is: config, generation config (alignment heads,
  suppressed tokens), tokenizer. The weights alone are 72 MiB, so the bundle is in two parts, each at most
  ``--max-mib`` (60 MiB): part ``a`` holds the token embedding (38 MiB), part ``b`` the rest;
- the dev sets' audio (``manifest.jsonl``, ``manifest-other.jsonl``), decoded here by the pipeline's own decoder to
  16 kHz, stored losslessly (int16 sample differences, byte planes, deflate: 40.6 MiB of samples in 26 MiB), with
  ids and references in ``b/bundle.json``;
- pure-Python wheels: the text normaliser (``whisper_normalizer``, ``more_itertools``) and the reference
  ``openai-whisper`` that the CUDA tests compare with; gpu_check unpacks them into a temporary folder appended to
  ``sys.path`` (installed packages come first), and its ``pytest -m gpu`` gets the same folder.

The two parts travel in two calls on the warm machine: the first carries ``.gpu-bundle/a`` (nothing to run), the
second ``.gpu-bundle/b`` and runs the check (docs/gpu.md). Multilingual ``base`` is not bundled: its fp16 weights
(145 MB) would take three more calls.
"""

from __future__ import annotations

import argparse
import atexit
import dataclasses
import hashlib
import importlib.metadata
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / ".gpu-bundle"
EVAL_DIR = REPO.parent / "shared" / "data" / "eval"
DEV_SETS = {"dev-clean": EVAL_DIR / "manifest.jsonl", "dev-other": EVAL_DIR / "manifest-other.jsonl"}
MODEL_DIR = "tiny.en"  # in each part
INDEX = "bundle.json"  # in part b
PARTS = ("a", "b")
FIRST_SHARD = "model-00001-of-00002.safetensors"  # part a: the token embedding
SECOND_SHARD = "model-00002-of-00002.safetensors"  # part b: every other tensor
FIRST_SHARD_TENSORS = ("model.decoder.embed_tokens.weight",)
WHEELS = ("whisper_normalizer", "more_itertools")  # the English normaliser and its one dependency the GPU lacks
REFERENCE = "openai-whisper"  # the CUDA tests' reference (its needs numba, tiktoken, tqdm are on the GPU machine)
MAX_MIB = 60.0
MiB = 2**20


# ---- reading a bundle (numpy and the standard library only: this runs on the GPU machine) ----


def encode_audio(samples: np.ndarray) -> dict[str, np.ndarray]:
    """int16 samples -> two byte planes of their first differences (lossless; deflate halves them)."""
    d = np.diff(samples.astype(np.int16), prepend=np.int16(0)).astype(np.int16)
    planes = d.view(np.uint8).reshape(-1, 2)
    return {"lo": np.ascontiguousarray(planes[:, 0]), "hi": np.ascontiguousarray(planes[:, 1])}


def decode_audio_planes(lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """The inverse of :func:`encode_audio`: int16 samples (the running sum wraps as the differences did)."""
    d = np.stack([lo, hi], axis=1).reshape(-1).view(np.int16)
    return np.cumsum(d, dtype=np.int16)


class Bundle:
    """A bundle folder: ``a/`` and ``b/``, its index ``b/bundle.json``."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        index = self.root / "b" / INDEX
        if not index.is_file():
            raise FileNotFoundError(f"{index}: no bundle index (python -m benchmarks.gpu_bundle --out {self.root})")
        self.index: dict[str, Any] = json.loads(index.read_text())
        self.site: str | None = None  # where add_wheels unpacked the wheels

    def missing(self) -> list[str]:
        """Files the index lists that are absent or of another size (e.g. part a not carried by an earlier call)."""
        out = []
        for rel, size in self.index["files"].items():
            p = self.root / rel
            if not p.is_file() or p.stat().st_size != size:
                out.append(rel)
        return out

    def check(self) -> None:
        missing = self.missing()
        if missing:
            parts = sorted({m.split("/")[0] for m in missing})
            raise FileNotFoundError(
                f"bundle {self.root}: {len(missing)} file(s) missing or truncated in part(s) {', '.join(parts)} "
                f"({missing[0]}, ...): carry .gpu-bundle/a in the call before this one, on the same warm machine")

    @contextmanager
    def model_dir(self) -> Iterator[Path]:
        """A temporary checkpoint folder joining both parts' ``tiny.en/`` files (symbolic links)."""
        self.check()
        with tempfile.TemporaryDirectory(prefix="gpu-bundle-model-") as tmp:
            for part in PARTS:
                src = self.root / part / MODEL_DIR
                for f in sorted(src.iterdir()) if src.is_dir() else []:
                    os.symlink(f.resolve(), Path(tmp) / f.name)
            yield Path(tmp)

    def sets(self) -> dict[str, list[dict[str, Any]]]:
        """Rows per set: the index's fields (``id``, ``reference``, ...) and ``audio``, float32 16 kHz, exactly as
        the pipeline's decoder gives it."""
        self.check()
        out = {}
        for name, spec in self.index["sets"].items():
            with np.load(self.root / spec["file"]) as z:
                samples = decode_audio_planes(z["lo"], z["hi"])
            bounds = np.cumsum([0] + [r["samples"] for r in spec["rows"]])
            out[name] = [dict(r, audio=samples[bounds[i] : bounds[i + 1]].astype(np.float32) / 32768.0)
                         for i, r in enumerate(spec["rows"])]
        return out

    def add_wheels(self) -> list[str]:
        """Unpacks the bundled pure-Python wheels into a temporary folder appended to ``sys.path`` (installed
        packages come first); returns the wheels' names."""
        wheels = sorted((self.root / "b" / "wheels").glob("*.whl"))
        if not wheels:
            return []
        self.site = target = tempfile.mkdtemp(prefix="gpu-bundle-site-")
        atexit.register(shutil.rmtree, target, True)
        for w in wheels:
            with zipfile.ZipFile(w) as z:
                z.extractall(target)
        if target not in sys.path:
            sys.path.append(target)
        return [w.name for w in wheels]


# ---- writing one (here: the packaged weights, PyAV, pip) ----


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def hf_names(state_dict: dict[str, Any]) -> dict[str, Any]:
    """Reference (OpenAI) names -> Hugging Face transformers names: the inverse of
    ``whisper_batch.model.hf_checkpoint.hf_to_reference``."""
    from whisper_batch.model.hf_checkpoint import _HF_LAYER_MODULES, _HF_TOP

    layer = {ref: hf for hf, ref in _HF_LAYER_MODULES.items()}
    top = {ref: hf for hf, ref in _HF_TOP.items()}
    out = {}
    for key, value in state_dict.items():
        m = re.match(r"^(encoder|decoder)\.blocks\.(\d+)\.(.+)\.(weight|bias)$", key)
        if key in top:
            name = top[key]
        elif m and m.group(3) in layer:
            side, index, module, param = m.groups()
            name = f"{side}.layers.{index}.{layer[module]}.{param}"
        elif re.match(r"^encoder\.conv[12]\.(weight|bias)$", key):
            name = key
        else:
            raise ValueError(f"no Hugging Face name for {key}")
        out[f"model.{name}"] = value
    return out


def write_model(ckpt, out: Path) -> None:
    """``ckpt`` (a loaded Checkpoint) as a transformers Whisper folder split over ``out/a`` and ``out/b``."""
    from safetensors.torch import save_file

    d = ckpt.dims
    tensors = {k: v.contiguous() for k, v in hf_names(ckpt.state_dict).items()}
    first = {k: tensors[k] for k in FIRST_SHARD_TENSORS}
    second = {k: v for k, v in tensors.items() if k not in first}
    a, b = out / "a" / MODEL_DIR, out / "b" / MODEL_DIR
    a.mkdir(parents=True)
    b.mkdir(parents=True)
    save_file(first, a / FIRST_SHARD, metadata={"format": "pt"})
    save_file(second, b / SECOND_SHARD, metadata={"format": "pt"})
    total = sum(v.numel() * v.element_size() for v in tensors.values())
    weight_map = {k: FIRST_SHARD for k in first} | {k: SECOND_SHARD for k in second}
    (b / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    config = {
        "model_type": "whisper", "architectures": ["WhisperForConditionalGeneration"], "torch_dtype": "float16",
        "num_mel_bins": d.n_mels, "vocab_size": d.n_vocab, "d_model": d.n_audio_state,
        "encoder_layers": d.n_audio_layer, "encoder_attention_heads": d.n_audio_head,
        "decoder_layers": d.n_text_layer, "decoder_attention_heads": d.n_text_head,
        "encoder_ffn_dim": 4 * d.n_audio_state, "decoder_ffn_dim": 4 * d.n_text_state,
        "max_source_positions": d.n_audio_ctx, "max_target_positions": d.n_text_ctx,
    }
    (b / "config.json").write_text(json.dumps(config, indent=1))
    generation = {"alignment_heads": [list(p) for p in ckpt.alignment_heads or []],
                  "suppress_tokens": list(ckpt.suppress_ids or [])}
    (b / "generation_config.json").write_text(json.dumps(generation, indent=1))
    shutil.copy(ckpt.tokenizer_path, b / "tokenizer.json")


def check_model(ckpt, bundle: Bundle) -> None:
    """The bundle's checkpoint loads as the packaged one: dimensions, every tensor bit for bit, heads, suppressions."""
    import torch

    from whisper_batch.model.checkpoint import load_checkpoint

    with bundle.model_dir() as path:
        got = load_checkpoint(str(path))
    problems = []
    if got.dims != ckpt.dims:
        problems.append(f"dims {got.dims} != {ckpt.dims}")
    if set(got.state_dict) != set(ckpt.state_dict):
        problems.append(f"tensors differ: {sorted(set(got.state_dict) ^ set(ckpt.state_dict))[:5]}")
    else:
        problems += [f"{k} differs" for k, v in ckpt.state_dict.items()
                     if v.dtype != got.state_dict[k].dtype or not torch.equal(v, got.state_dict[k])]
    if (got.alignment_heads or []) != (ckpt.alignment_heads or []):
        problems.append("alignment heads differ")
    if list(got.suppress_ids or []) != list(ckpt.suppress_ids or []):
        problems.append("suppressed tokens differ")
    if problems:
        raise AssertionError(f"the bundled checkpoint is not the packaged one: {problems[:5]}")


def read_set(manifest: Path, rows: int | None) -> tuple[list[dict[str, Any]], np.ndarray]:
    """The manifest's rows with a reference (the first ``rows``), decoded by the pipeline's decoder: (rows, int16)."""
    from whisper_batch.pipeline.audio import decode_audio, read_bytes
    from whisper_batch.pipeline.manifest import read_manifest

    out, chunks = [], []
    for r in read_manifest(str(manifest)):
        if not r.reference:
            continue
        if rows is not None and len(out) >= rows:
            break
        duration = None if r.duration is None or r.duration != r.duration else float(r.duration)  # NaN: none
        audio = decode_audio(read_bytes(r.uri), offset=float(r.offset or 0.0), duration=duration, name=r.uri)
        samples = np.round(audio * 32768.0).astype(np.int16)
        if not np.array_equal(samples.astype(np.float32) / 32768.0, audio):
            raise AssertionError(f"{r.uri}: the decoder's samples are not 16-bit: the bundle would change them")
        out.append({"id": r.id, "reference": r.reference, "audio_filepath": r.audio_filepath,
                    "language": r.language, "samples": len(samples)})
        chunks.append(samples)
    return out, (np.concatenate(chunks) if chunks else np.zeros(0, np.int16))


def download_wheels(dest: Path) -> list[Path]:
    """Pure-Python wheels, at the versions installed here: the normaliser's for CPython 3.12 (``pip download``), and
    the reference openai-whisper the CUDA tests compare with (an sdist on PyPI: ``pip wheel``, no build of
    anything compiled)."""
    dest.mkdir(parents=True)
    pip = [sys.executable, "-m", "pip"]
    specs = [f"{name}=={importlib.metadata.version(name)}" for name in WHEELS]
    commands = [[*pip, "download", "-q", "--no-deps", "--only-binary=:all:", "--python-version", "3.12",
                 "--implementation", "cp", "--platform", "manylinux2014_x86_64", "-d", str(dest), *specs]]
    try:
        reference = f"{REFERENCE}=={importlib.metadata.version(REFERENCE)}"
        commands.append([*pip, "wheel", "-q", "--no-deps", "-w", str(dest), reference])
    except importlib.metadata.PackageNotFoundError:  # no reference here: the CUDA tests will skip there
        pass
    for cmd in commands:
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd[2:4])} {' '.join(cmd[-len(specs):])} failed: "
                               f"{proc.stderr.strip()[-500:]}")
    wheels = sorted(dest.glob("*.whl"))
    compiled = [w.name for w in wheels if not w.name.endswith("-none-any.whl")]
    if compiled:
        raise RuntimeError(f"wheels that are not pure Python cannot be unpacked onto sys.path: {compiled}")
    return wheels


def part_sizes(out: Path) -> dict[str, int]:
    return {p: sum(f.stat().st_size for f in (out / p).rglob("*") if f.is_file()) for p in PARTS}


def build(out: Path = DEFAULT_OUT, sets: dict[str, Path] | None = None, rows: int | None = None,
          max_mib: float = MAX_MIB, model: str | None = None, echo=print) -> dict[str, Any]:
    """Writes the bundle into ``out`` (replacing it); returns its index. Fails when a part is over ``max_mib``."""
    from whisper_batch.model.checkpoint import load_checkpoint

    t0 = time.perf_counter()
    sets = dict(DEV_SETS if sets is None else sets)
    absent = [str(m) for m in sets.values() if not Path(m).is_file()]
    if absent:
        raise SystemExit(f"error: no manifest {', '.join(absent)} (the dev sets live in ../shared/data/eval; "
                         f"--set NAME=MANIFEST bundles others)")
    if out.exists():
        shutil.rmtree(out)
    ckpt = load_checkpoint(model)
    write_model(ckpt, out)
    index: dict[str, Any] = {"model": ckpt.name, "dims": dataclasses.asdict(ckpt.dims), "sets": {}, "files": {},
                             "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    wheels = download_wheels(out / "b" / "wheels")
    index["wheels"] = [w.name for w in wheels]
    sizes = part_sizes(out)
    for name, manifest in sets.items():
        set_rows, samples = read_set(manifest, rows)
        planes = encode_audio(samples)
        assert np.array_equal(decode_audio_planes(planes["lo"], planes["hi"]), samples)
        part = min(PARTS, key=lambda p: sizes[p])  # the part with the most room
        rel = f"{part}/audio-{name}.npz"
        np.savez_compressed(out / rel, **planes)
        sizes[part] += (out / rel).stat().st_size
        index["sets"][name] = {"file": rel, "manifest": str(manifest), "rows": set_rows,
                               "seconds": round(len(samples) / 16000, 1)}
        echo(f"  {name}: {len(set_rows)} rows, {len(samples) / 16000:.0f} s of audio, "
             f"{samples.nbytes / MiB:.1f} MiB of samples in {(out / rel).stat().st_size / MiB:.1f} MiB ({rel})")
    index_path = out / "b" / INDEX
    index["files"] = {f.relative_to(out).as_posix(): f.stat().st_size
                      for p in PARTS for f in sorted((out / p).rglob("*")) if f.is_file() and f != index_path}
    index["sha256"] = {rel: _sha256(out / rel) for rel in index["files"] if rel.endswith(".safetensors")}
    index_path.write_text(json.dumps(index, indent=1))
    check_model(ckpt, Bundle(out))
    sizes = part_sizes(out)
    for p in PARTS:
        echo(f"part {p}: {sizes[p] / MiB:.1f} MiB ({out / p})")
    echo(f"bundle {out}: {sum(sizes.values()) / MiB:.1f} MiB in {len(PARTS)} parts, "
         f"{time.perf_counter() - t0:.0f} s; the checkpoint loads bit for bit as {ckpt.name}")
    over = [p for p in PARTS if sizes[p] > max_mib * MiB]
    if over:
        raise SystemExit(f"error: part(s) {', '.join(over)} over {max_mib:g} MiB: fewer rows (--rows) or sets "
                         f"(--set), or a larger --max-mib if the 64 MiB a call carries allows")
    return index


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu_bundle", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="the bundle folder (default: .gpu-bundle/)")
    p.add_argument("--set", dest="sets", action="append", metavar="NAME=MANIFEST",
                   help="a set of rows to bundle (repeatable; default: dev-clean and dev-other, ../shared/data/eval)")
    p.add_argument("--rows", type=int, default=None, help="at most this many rows per set (default: all)")
    p.add_argument("--max-mib", type=float, default=MAX_MIB, help="the most one part may hold (default: 60)")
    args = p.parse_args(argv)
    sets = None
    if args.sets:
        sets = {}
        for spec in args.sets:
            name, sep, path = spec.partition("=")
            if not sep:
                p.error(f"--set {spec}: expected NAME=MANIFEST")
            sets[name] = Path(path)
    build(args.out, sets, args.rows, args.max_mib)
    return 0


if __name__ == "__main__":
    sys.exit(main())
