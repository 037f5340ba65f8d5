"""Steering and ablation against plain sampling, through the same engine, in one process on one GPU.

A random-weight Llama of `--shape` (gpu_speed.py's `build_model`: the 1B shape by default,
random stop ids so answers end at a geometric length) samples the reference evaluation
(8 general questions × `--samples` answers, up to `--max-new` new tokens, temperature 1,
batch `--batch`) through `sample_answers`, three ways:

- plain: no intervention;
- steer: λ·v added after the middle layer (v a random unit vector × `--norm`, λ = `--lam`);
- ablate: v projected out of the residual stream after every layer.

Each mode is warmed up once (its decode graphs recorded), then the modes are timed in turn,
`--repeats` rounds; a figure is the median over rounds. Steering changes the answers and so
their lengths, so the comparison is in new tokens per second (up to and including the stop
token); the ratio to plain is the done-when figure of issue 16 (≥ 0.8).

Writes `steer_speed.jsonl` (one row per mode) and `steer_speed.md` under `--out`.

    python bench/steer_speed.py --data .gpudata --out bench/results/            # the GPU run
    python bench/steer_speed.py --data .gpudata --out /tmp/steer --quick        # CPU check of the script
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from emlab.config.experiment import SampleSpec
from emlab.sample.generate import release_sampler, sample_answers
from emlab.sample.protocol import Intervention
from transformers import AutoTokenizer

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_speed import (
    SHAPES,
    VOCAB,
    build_model,
    reference_prompts,
    stop_ids,
    sync,
    versions,
)

MODES = ("plain", "steer", "ablate")


def intervention_for(mode: str, direction: torch.Tensor, layer: int, lam: float) -> Intervention | None:
    if mode == "plain":
        return None
    if mode == "steer":
        return Intervention(direction, layer=layer, scale=lam, label=f"steer λ={lam:g} after layer {layer}")
    return Intervention(direction, ablate=True, label="ablate at every layer")


def sample_once(model: Any, tokenizer: Any, prompts: list[Any], spec: SampleSpec, intervention: Intervention | None,
                out: Path, seed: int) -> tuple[float, int]:
    """One `sample_answers` call; seconds and new tokens."""
    sync()
    started = time.perf_counter()
    answers = sample_answers(model, tokenizer, prompts, spec, model_name="bench", run_id="r", step=1, seed=seed,
                             out_path=out, progress=False, intervention=intervention)
    sync()
    return time.perf_counter() - started, sum(a.new_tokens for a in answers)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="folder with tokenizer/ (as gpu_speed.py's --data)")
    parser.add_argument("--out", required=True)
    parser.add_argument("--shape", default="1b", choices=sorted(SHAPES))
    parser.add_argument("--samples", type=int, default=50, help="answers per question (8 questions)")
    parser.add_argument("--max-new", type=int, default=600)
    parser.add_argument("--batch", default="400", help="sample.batch_size: a number or auto")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--stop-tokens", type=int, default=641, help="random stop ids added to the eos ids")
    parser.add_argument("--lam", type=float, default=8.0, help="λ of the steering setting")
    parser.add_argument("--norm", type=float, default=1.0, help="norm of the random direction v")
    parser.add_argument("--quick", action="store_true", help="tiny shape and sizes: a CPU check of the script")
    args = parser.parse_args()
    if args.quick:
        args.shape, args.samples, args.max_new, args.repeats, args.batch = "tiny", 2, 16, 1, "16"
    logging.basicConfig(level=logging.WARNING)
    tokenizer = AutoTokenizer.from_pretrained(Path(args.data) / "tokenizer")
    stops = stop_ids(tokenizer, args.stop_tokens, SHAPES[args.shape].get("vocab_size", VOCAB))
    model = build_model(args.shape, tokenizer, stops)
    layers = model.config.num_hidden_layers
    generator = torch.Generator().manual_seed(0)
    direction = torch.randn(model.config.hidden_size, generator=generator)
    direction = direction / direction.norm() * args.norm
    prompts = reference_prompts()
    spec = SampleSpec(samples_per_question=args.samples, max_new_tokens=args.max_new, temperature=1.0,
                      batch_size=args.batch if args.batch == "auto" else int(args.batch), wave_size=100_000)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="emlab-steer-bench-"))
    meta = {"date": time.strftime("%Y-%m-%d"), "versions": versions(), "shape": args.shape,
            "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
            "answers": len(prompts) * args.samples, "max_new": args.max_new, "batch": args.batch,
            "layer": layers // 2, "lambda": args.lam}
    runs: dict[str, list[tuple[float, int]]] = {m: [] for m in MODES}
    try:
        for mode in MODES:  # warm-up: each mode's graphs recorded once
            sample_once(model, tokenizer, prompts, spec, intervention_for(mode, direction, layers // 2, args.lam),
                        work / f"warm-{mode}.jsonl", seed=0)
        for r in range(args.repeats):
            for mode in MODES:
                runs[mode].append(sample_once(model, tokenizer, prompts, spec,
                                              intervention_for(mode, direction, layers // 2, args.lam),
                                              work / f"{mode}-{r}.jsonl", seed=1 + r))
    finally:
        release_sampler(model)
        shutil.rmtree(work, ignore_errors=True)
    rows = []
    plain_rate = statistics.median(t / s for s, t in runs["plain"])
    for mode in MODES:
        rate = statistics.median(t / s for s, t in runs[mode])
        row = {**meta, "mode": mode, "seconds": [round(s, 3) for s, _ in runs[mode]],
               "new_tokens": [t for _, t in runs[mode]], "tokens_per_s": round(rate, 1),
               "of_plain": round(rate / plain_rate, 3)}
        rows.append(row)
        print(json.dumps(row), flush=True)
    with open(out / "steer_speed.jsonl", "a") as handle:
        handle.writelines(json.dumps(row) + "\n" for row in rows)
    table = ["| mode | new tokens/s (median) | of plain | seconds per call |", "|---|---|---|---|"]
    table += [f"| {r['mode']} | {r['tokens_per_s']:,} | {r['of_plain']:.0%} | {', '.join(map(str, r['seconds']))} |"
              for r in rows]
    text = (f"{args.shape} shape on {meta['device']}: {meta['answers']} answers ≤ {args.max_new} tokens, batch "
            f"{args.batch}; steer: λ = {args.lam:g} after layer {layers // 2}; ablate: every layer\n\n" + "\n".join(table))
    (out / "steer_speed.md").write_text(text + "\n")
    print("\n" + text)


if __name__ == "__main__":
    main()
