"""``make gpu-check``: everything a GPU must show, in one command, as one table.

On a CUDA device (aimed at <= 8 minutes on one H100/H200):

1. the CUDA tests (``pytest -m gpu``);
2. tiny.en and base on the dev set (``manifest.jsonl`` + ``manifest-other.jsonl``), CUDA fp16 against CPU fp32 with
   the yardstick's paired comparison (rows better/worse, bootstrap 95 % interval);
3. large-v3 shapes (128 mel bins, 1280 wide, 32 + 32 layers, 20 heads, 51,866 tokens, 448 text positions; random
   weights) in fp16 and bf16 at growing batch sizes until memory or the time budget (``--budget-s``) runs out:
   encoder plus a fixed number of greedy decoding steps per window, RTFx = 30 s x windows / wall;
4. the decoder step with a static cache (position as a tensor, fixed shapes) replayed as a CUDA graph, against the
   eager ``model.decode_step``;
5. HF transformers' Whisper ``generate`` on the same shapes, when ``transformers`` imports.

Without CUDA (or with ``--self-test``) it says so and runs the same functions on the CPU with tiny shapes in well under
2 minutes: the static step is checked against ``decode_step`` (same logits), the dev-set comparison runs on the
examples, the shape benchmark on two small batches. ``tests/unit/test_gpu_check.py`` runs that self-test.
"""

from __future__ import annotations

import argparse
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


def dev_compare(model: str, device_overrides: list[str], sets: dict[str, Path]) -> str:
    from benchmarks.yardstick import run_config, score

    with tempfile.TemporaryDirectory() as tmp:
        results = [
            run_config("fp32", ["model.device=cpu", "model.dtype=float32"], model, sets, Path(tmp),
                       echo=lambda m: None),
            run_config("device", device_overrides, model, sets, Path(tmp), echo=lambda m: None),
        ]
    scored = score(sets, results)
    p = scored["paired"]["device"]["all"]
    lo, hi = p["ci"]
    return (f"{results[1]['dtype']}: WER {100 * p['cand_wer']:.2f} % vs CPU fp32 {100 * p['ref_wer']:.2f} % over "
            f"{p['words']} words; rows better {p['better']}, worse {p['worse']}; diff 95 % [{100 * lo:+.2f}, "
            f"{100 * hi:+.2f}] {'keeps accuracy' if p['keeps'] else 'WORSE'}")


def run_gpu_tests(collect_only: bool) -> str:
    cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider"]
    cmd += ["--collect-only"] if collect_only else ["-x"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    last = (proc.stdout.strip().splitlines() or ["(no output)"])[-1]
    if proc.returncode == 5:
        return f"no tests marked gpu ({last})"
    if proc.returncode != 0 and not collect_only:
        raise RuntimeError(f"pytest -m gpu failed: {last}")
    return last


# ---- the two modes ----


def check(self_test: bool, budget_s: float = 200.0, echo: Callable[[str], None] = print) -> Report:
    """Every check in order of importance: the tests, the shapes (each dtype stops growing its batch after
    ``budget_s / 2``), HF generate, then the dev set (real weights; its CPU fp32 reference takes the longest)."""
    cuda = torch.cuda.is_available() and not self_test
    device = "cuda" if cuda else "cpu"
    report = Report(echo)
    echo(versions(device))
    report.run("CUDA tests", "pytest -m gpu" + ("" if cuda else " --collect-only (no CUDA)"),
               lambda: run_gpu_tests(collect_only=not cuda))
    report.run("static step", f"{device} fp32, tiny random", lambda: check_static_step(device))
    if cuda:
        from benchmarks.make_yardstick import DEV_MANIFESTS, EVAL_DIR

        dims, batches, n_tokens = LARGE_V3, [1, 8, 32, 64, 128, 256, 512], 100
        dtypes = (torch.float16, torch.bfloat16)
        sets = {name: EVAL_DIR / f for name, f in DEV_MANIFESTS.items()}
        dev_runs = [("tiny.en", "tiny.en: cuda fp16 vs cpu fp32"), ("base", "base: cuda fp16 vs cpu fp32")]
        dev_overrides = ["model.device=cuda"]
    else:
        dims, batches, n_tokens = SELF_TEST, [1, 2], 4
        dtypes = (torch.float32, torch.bfloat16)
        sets = {"examples": REPO / "examples" / "manifest.jsonl"}
        dev_runs = [(None, "tiny.en: cpu bf16/auto vs cpu fp32 (examples)")]
        dev_overrides = ["model.device=cpu"]
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
    for model, setting in dev_runs:
        report.run("dev set", setting, lambda m=model: dev_compare(m, dev_overrides, sets))
    return report


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu_check", description=__doc__.split("\n\n")[0])
    p.add_argument("--self-test", action="store_true", help="the CPU self-test even where CUDA is available")
    p.add_argument("--budget-s", type=float, default=200.0,
                   help="seconds after which the shape benchmark stops growing batches (half per dtype)")
    args = p.parse_args(argv)
    if not args.self_test and not torch.cuda.is_available():
        print("no CUDA device here: running the CPU self-test (tiny shapes, the same code paths)")
    t0 = time.perf_counter()
    report = check(args.self_test or not torch.cuda.is_available(), args.budget_s)
    device = "cuda" if torch.cuda.is_available() and not args.self_test else "cpu"
    print(report.table(f"gpu-check on {versions(device)}; {time.perf_counter() - t0:.0f} s in all"))
    return 1 if any(r.startswith("FAILED") for _, _, r, _ in report.rows) else 0


if __name__ == "__main__":
    sys.exit(main())
