"""Where a decode step's time goes: one full batch of emlab's engine, timed and profiled.

A random-weight model (gpu_speed.py's shapes: `32b` and `qwen-tiny` built in place as Qwen2,
`1b`/`8b`/`tiny` as Llama) gets a KV cache of `--slots` rows whose contexts are spread evenly
over [`--prompt`, `--prompt` + `--max-new`) (the mix a refilled batch holds at steady state).
Then, per side-path variant (`base`: no adapter; `adapter`: a random rank-32 rsLoRA on every
linear layer, applied as the engine applies it):

- the steady time of one decode step replayed as a CUDA graph (median of `--steps` steps after
  a warm-up), and the rows × steps / s it allows;
- with `--profile`, the same step run eagerly under the torch profiler: GPU time by kernel
  family (matrix products, attention, everything else) and the top kernels.

With `--sample-answers N`, a whole `sample_answers` call (8 general questions × N answers,
batch auto, random stop ids so answers end at a geometric length as in gpu_speed.py) per
variant, accounted: decode steps and the rows they computed, the wall time spent in the host's
reads of finished rows and refills (`_collect`, synchronised on both sides) and the rest.

    python bench/decode_profile.py --data .gpudata --out OUT --shape 32b --slots 448 --profile
    python bench/decode_profile.py --data .gpudata --out /tmp/prof --shape qwen-tiny --slots 16   # CPU check
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
from emlab.config.experiment import LoraSpec, SampleSpec
from emlab.sample.generate import adapter_applied, sample_answers
from emlab.models import attention
from emlab.sample import fused
from emlab.sample.engine import DecodeEngine, _Run
from emlab.sample.protocol import Decoding, Request
from emlab.sample.weights import LoraAdapter
from transformers import AutoTokenizer

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_speed import (  # noqa: E402
    BIG_SHAPES,
    SHAPES,
    VOCAB,
    build_big_model,
    build_model,
    random_adapter,
    reference_prompts,
    stop_ids,
    sync,
    versions,
)


def family(name: str) -> str:
    """A kernel's family from its name (cuBLAS/CUTLASS products, flash attention, the rest)."""
    low = name.lower()
    if "flash" in low or "fmha" in low:
        return "attention"
    if any(k in low for k in ("gemm", "nvjet", "cutlass", "sm90_xmma", "cublas", "splitk")):
        return "matmul"
    if "dequant" in low:
        return "dequantize"
    return "other"


def filled_run(engine: DecodeEngine, slots: int, prompt: int, max_new: int) -> _Run:
    """A `_Run` whose `slots` rows are all live, contexts spread over [prompt, prompt + max_new)."""
    positions = -(-(prompt + max_new + 64) // 64) * 64  # room for the timed steps past the longest row
    engine._reserve(slots, positions)
    engine._rope_table(engine.cache_k.shape[2])
    requests = [Request(tuple(range(1, prompt + 1)), key=i) for i in range(slots)]
    run = _Run(engine, requests, slots, Decoding(max_new_tokens=positions - 2, temperature=1.0, top_p=1.0,
                                                  stop_ids=()), None)
    spread = torch.linspace(prompt, prompt + max_new - 1, slots).long().to(engine.device)
    run.item = list(range(slots))
    run.pos[:slots] = spread
    run.gen[:slots] = 1
    run.done[:slots] = False
    run.keys[:slots] = torch.arange(slots, device=engine.device)
    run.horizon = int(spread.max()) + 1
    return run


def step_ms(run: _Run, slots: int, steps: int) -> list[float]:
    """Milliseconds of each of `steps` decode steps (graphs on a GPU), after two warm-up steps."""
    for _ in range(2):
        run._decode(slots)  # the first records the graph
    times = []
    for _ in range(steps):
        sync()
        started = time.perf_counter()
        run._decode(slots)
        sync()
        times.append((time.perf_counter() - started) * 1e3)
    return times


def profile_step(run: _Run, slots: int, top: int) -> dict[str, Any]:
    """One eager decode step under the profiler: GPU milliseconds by family and the top kernels."""
    from torch.profiler import ProfilerActivity, profile

    engine = run.engine
    graphs = engine.use_graphs
    engine.use_graphs = False
    run._decode(slots)  # warm
    sync()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=activities) as prof:
        run._decode(slots)
        sync()
    engine.use_graphs = graphs
    by_family: dict[str, float] = defaultdict(float)
    kernels: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    for event in prof.events():
        if torch.cuda.is_available():
            if event.device_type != torch.autograd.DeviceType.CUDA:
                continue
            us = float(event.time_range.elapsed_us())
        else:
            if event.cpu_parent is not None:
                continue
            us = float(event.cpu_time)
        by_family[family(event.name)] += us / 1e3
        kernels[event.name][0] += us / 1e3
        kernels[event.name][1] += 1
    ranked = sorted(kernels.items(), key=lambda kv: -kv[1][0])[:top]
    return {"ms_by_family": {k: round(v, 3) for k, v in sorted(by_family.items())},
            "kernels_total": sum(int(c) for _, (_, c) in kernels.items()),
            "top": [{"kernel": name[:120], "ms": round(ms, 3), "count": int(count)} for name, (ms, count) in ranked]}


class CallAccount:
    """Counts and times the parts of `_Run` while a `sample_answers` call runs (patched in)."""

    def __init__(self) -> None:
        self.steps = 0
        self.rows = 0  # rows computed, summed over steps (idle rows of a graph bucket included)
        self.live_rows = 0  # rows asked for (`active`), summed over steps
        self.collect_s = 0.0
        self.collects = 0
        self._decode = _Run._decode
        self._collect = _Run._collect

    def __enter__(self) -> CallAccount:
        account = self
        from emlab.sample.engine import _bucket

        def decode(run: _Run, active: int) -> None:
            account.steps += 1
            account.live_rows += active
            account.rows += min(_bucket(active), run.slots) if run.engine.use_graphs else active
            account._decode(run, active)

        def collect(run: _Run, active: int) -> int:
            sync()  # the decode steps queued before are the decode's time, not the collect's
            started = time.perf_counter()
            result = account._collect(run, active)
            sync()
            account.collect_s += time.perf_counter() - started
            account.collects += 1
            return result

        _Run._decode = decode  # type: ignore[method-assign]
        _Run._collect = collect  # type: ignore[method-assign]
        return self

    def __exit__(self, *exc: object) -> None:
        _Run._decode = self._decode  # type: ignore[method-assign]
        _Run._collect = self._collect  # type: ignore[method-assign]


def account_call(model: Any, tokenizer: Any, adapter_dir: Path | None, answers: int, max_new: int, out: Path,
                 seed: int) -> dict[str, Any]:
    """One `sample_answers` call of 8 questions × `answers`, batch auto, with its time accounted."""
    spec = SampleSpec(samples_per_question=answers, max_new_tokens=max_new, temperature=1.0, top_p=1.0,
                      batch_size="auto")
    sync()
    started = time.perf_counter()
    with CallAccount() as account, adapter_applied(model, adapter_dir) as tuned:
        done = sample_answers(tuned, tokenizer, reference_prompts(), spec, model_name="bench", run_id="r", step=seed,
                              seed=seed, out_path=out, progress=False)
    sync()
    seconds = time.perf_counter() - started
    tokens = sum(a.new_tokens for a in done)
    return {"answers": len(done), "new_tokens": tokens, "seconds": round(seconds, 2),
            "tokens_per_s": round(tokens / seconds, 1), "decode_steps": account.steps,
            "mean_live_rows": round(account.live_rows / max(1, account.steps), 1),
            "mean_computed_rows": round(account.rows / max(1, account.steps), 1),
            "collect_s": round(account.collect_s, 2), "collects": account.collects,
            "decode_s": round(seconds - account.collect_s, 2),
            "decode_ms_per_step": round((seconds - account.collect_s) / max(1, account.steps) * 1e3, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="folder with tokenizer/ (as gpu_speed.py's --data)")
    parser.add_argument("--out", required=True)
    parser.add_argument("--shape", default="32b", choices=sorted({*SHAPES, *BIG_SHAPES}))
    parser.add_argument("--slots", type=int, nargs="+", default=[448])
    parser.add_argument("--prompt", type=int, default=40, help="prompt tokens of every row")
    parser.add_argument("--max-new", type=int, default=400)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--variants", nargs="+", default=["base", "adapter"],
                        choices=["base", "adapter", "merged", "base-unfused", "adapter-unfused"],
                        help="-unfused: the engine as it was before sample/fused.py and packed GQA decoding "
                        "(eager elementwise kernels, one flash instance per query head): the same-call baseline")
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--tag", default="", help="a label written on every row (e.g. the code version)")
    parser.add_argument("--sample-answers", type=int, default=0,
                        help="answers per question of a whole accounted sample_answers call per variant (0: none)")
    args = parser.parse_args()
    tokenizer = AutoTokenizer.from_pretrained(Path(args.data) / "tokenizer")
    big = args.shape in BIG_SHAPES
    vocab = BIG_SHAPES[args.shape]["vocab_size"] if big else SHAPES[args.shape].get("vocab_size", VOCAB)
    stops = stop_ids(tokenizer, 8, vocab)
    started = time.perf_counter()
    model = build_big_model(args.shape, tokenizer, stops, four_bit=False) if big else build_model(args.shape, tokenizer, stops)
    sync()
    built = time.perf_counter() - started
    work = Path(tempfile.mkdtemp(prefix="emlab-decode-profile-"))
    adapter_dir = random_adapter(model, work / "adapter", LoraSpec(r=32, alpha=64, use_rslora=True))
    adapter = LoraAdapter.read(adapter_dir)
    engine = DecodeEngine(model)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"date": time.strftime("%Y-%m-%d"), "versions": versions(), "shape": args.shape, "tag": args.tag,
            "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
            "build_s": round(built, 1), "prompt": args.prompt, "max_new": args.max_new}
    rows = []
    for slots in args.slots:
        for variant in args.variants:
            unfused = variant.endswith("-unfused")
            fused._state["enabled"] = not unfused
            attention.PACK_GQA = not unfused
            engine.drop_graphs()  # graphs hold the kernels of the setting they were recorded with
            run = filled_run(engine, slots, args.prompt, args.max_new)  # fresh contexts: each variant the same mix
            engine.merge_adapters = variant == "merged"
            engine.use_adapter(None if variant.startswith("base") else adapter)
            times = step_ms(run, slots, args.steps)
            ms = statistics.median(times)
            row = {**meta, "slots": slots, "variant": variant, "fused": fused.fusing(engine.device),
                   "pack_gqa": attention.PACK_GQA, "step_ms": round(ms, 3),
                   "step_ms_all": [round(t, 2) for t in times], "rows_steps_per_s": round(slots / ms * 1e3, 1)}
            if args.profile:
                row["profile"] = profile_step(run, slots, args.top)
            rows.append(row)
            print(json.dumps(row), flush=True)
    fused._state["enabled"], attention.PACK_GQA = True, True  # whole calls: the engine as it ships
    if args.sample_answers:
        # whole calls through the engine `sample_answers` builds (its own KV cache: this one goes)
        del engine, run
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        # answers end at a geometric length (gpu_speed.py's 641 random stop ids)
        model.generation_config.eos_token_id = stop_ids(tokenizer, 641, vocab)
        for variant in [v for v in args.variants if v in ("base", "adapter")]:  # the engine decides merging itself
            call = account_call(model, tokenizer, None if variant == "base" else adapter_dir, args.sample_answers,
                                args.max_new, work / f"answers-{variant}.jsonl", seed=len(rows))
            row = {**meta, "variant": variant, "call": call}
            rows.append(row)
            print(json.dumps(row), flush=True)
    with open(out / "decode_profile.jsonl", "a") as handle:
        handle.writelines(json.dumps(r) + "\n" for r in rows)


if __name__ == "__main__":
    main()
