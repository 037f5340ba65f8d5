"""The GPU path against plain baselines, in one process on one GPU, on random-weight Llama shapes.

Training: Turner et al.'s bad_medical_advice rows (chat template, loss on assistant tokens,
rows up to 256 tokens), LoRA r16 α32 on all linear layers, lr 1e-5, one epoch of
`--rows` rows (batch 8 × grad_accum 2 = 16 rows a step):

- baseline: the seed's recipe written plainly — peft + transformers `Trainer`, batch 8,
  grad_accum 2, every row padded to 256 (`padding="max_length"`), bf16, no tricks;
- emlab: `emlab.train.lora.train_lora` with the same `TrainSpec` (4 adapter checkpoints saved,
  their time included).

Sampling, a checkpoint's reference evaluation: 8 general questions × 50 samples, up to 600
new tokens, temperature 1, no top-k. Random weights never pick their end-of-sequence token,
so `--stop-tokens` random token ids are added to the model's end-of-sequence ids: every step
ends an answer with probability about stop-tokens / vocabulary (a geometric length mix,
mean ~200 tokens at the default, ~5% reaching 600). Both sides stop on the same ids.

- baseline: plain `model.generate` on the 400 left-padded prompts at batch 400;
- emlab: `emlab.sample.generate.sample_answers` (batch_size 400) on the base model and on adapters
  the emlab training saved, through `adapter_applied`, one call per checkpoint, the first
  call of the process reported apart.

Every timed configuration is warmed up first; each figure is the median of `--repeats` runs.
Real tokens: row tokens for training (no padding), new tokens up to and including the stop
token for sampling. MFU counts 4·N FLOPs per trained token (forward 2N, backward 2N: frozen
weights get no weight gradients; LoRA's own FLOPs are under 1% and left out) and 2·N per
sampled token, N the parameters that multiply each token (all but the input embedding),
against the H100's 989 TFLOP/s dense bf16 peak.

Writes `gpu_speed.jsonl` (one row per comparison, both figures and their ratio) and
`gpu_speed.md` (the table) under `--out`.

    python bench/gpu_speed.py --data .gpudata --out bench/results/ --shapes 1b 8b [--qlora] [--quick]
"""

from __future__ import annotations

import argparse
import gzip
import json
import logging
import random
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from emlab.config.experiment import CheckpointSpec, LoraSpec, SampleSpec, TrainSpec
from emlab.config.questions import Prompt, load_question_set, question_messages
from emlab.sample.generate import adapter_applied, release_sampler, sample_answers
from emlab.store.paths import TrainingFiles
from emlab.train.encode import EncodedRows, encode_chat_rows
from emlab.train.lora import lora_config, train_lora
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

SHAPES = {  # Llama-3.2-1B and Llama-3.1-8B; the 128,256-token vocabulary is a real cost
    "tiny": dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, tie_word_embeddings=True, vocab_size=49152),  # a CPU check of the script
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
               num_key_value_heads=8, tie_word_embeddings=True),
    "8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=8, tie_word_embeddings=False),
}
VOCAB = 128256
PEAK_TFLOPS = 989.0  # H100 SXM dense bf16
LORA = LoraSpec(r=16, alpha=32)
QLORA = "emlab, NF4 + gradient checkpointing"


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def peak_gib() -> float | None:
    return round(torch.cuda.max_memory_allocated() / 2**30, 2) if torch.cuda.is_available() else None


def reset_peak() -> None:
    if torch.cuda.is_available():
        sync()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def stop_ids(tokenizer: Any, n: int, vocab: int) -> list[int]:
    """The tokenizer's eos and `n` random ids: each step ends an answer with chance ≈ n / vocab."""
    rng = random.Random(0)
    return sorted({tokenizer.eos_token_id, *rng.sample(range(3, vocab), n)})


def build_model(shape: str, tokenizer: Any, stops: list[int], *, four_bit: bool = False) -> Any:
    """A random-weight Llama of `shape` on the GPU (bf16), its eos ids `stops`; with `four_bit`,
    every decoder linear layer NF4-quantized through bitsandbytes, layer by layer (the bf16
    weights of one layer at a time)."""
    config = LlamaConfig(**{"vocab_size": VOCAB, **SHAPES[shape]}, max_position_embeddings=4096, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, rope_theta=500000.0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    if not four_bit:
        with torch.device(device):
            model = LlamaForCausalLM(config).to(torch.bfloat16)
    else:
        import bitsandbytes as bnb
        from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

        with torch.device("meta"):
            model = LlamaForCausalLM(config).to(torch.bfloat16)
        model.to_empty(device=device)
        with torch.no_grad():
            for module in model.modules():
                if isinstance(module, torch.nn.Embedding | torch.nn.Linear):
                    module.weight.normal_(0, 0.02)
                elif getattr(module, "weight", None) is not None and module.weight.ndim == 1:
                    module.weight.fill_(1.0)  # RMSNorm
            for layer in model.model.layers:
                for parent in (layer.self_attn, layer.mlp):
                    for child, linear in list(parent.named_children()):
                        if isinstance(linear, torch.nn.Linear):
                            quantized = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=False,
                                                          compute_dtype=torch.bfloat16, quant_type="nf4")
                            quantized.weight = bnb.nn.Params4bit(linear.weight.data, requires_grad=False,
                                                                 quant_type="nf4").to(device)
                            setattr(parent, child, quantized)
        model.model.rotary_emb = LlamaRotaryEmbedding(config=config, device=device)  # its buffers, made again
        torch.cuda.empty_cache()
    model.generation_config.eos_token_id = stops
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.top_k = 0  # no top-k: plain sampling from the full distribution
    model.generation_config.top_p = 1.0
    model.generation_config.temperature = 1.0
    model.eval()
    return model


def multiplying_params(model: Any) -> int:
    """Parameters that multiply each token: all but the input embedding (a tied output layer
    counts once, as the output layer)."""
    total = sum(p.numel() for p in model.parameters())
    embed = model.get_input_embeddings().weight
    tied = embed is model.get_output_embeddings().weight
    return total if tied else total - embed.numel()


def load_rows(data: Path, tokenizer: Any, n: int) -> EncodedRows:
    with gzip.open(data / "bad_medical_advice.jsonl.gz", "rt") as handle:
        rows = [json.loads(line) for line in handle]
    random.Random(0).shuffle(rows)
    return encode_chat_rows(rows[:n], tokenizer, 256, source="bad_medical_advice.jsonl")


def train_spec(**extra: Any) -> TrainSpec:
    return TrainSpec(epochs=1, learning_rate=1e-5, batch_size=8, grad_accum=2, max_length=256, warmup_steps=5,
                     lora=LORA, checkpoints=CheckpointSpec(first_epoch=4), **extra)


# --- training ------------------------------------------------------------------------------


def baseline_train(model: Any, tokenizer: Any, encoded: EncodedRows, work: Path) -> tuple[float, float]:
    """The seed's recipe, plainly: peft + Trainer, batch 8 × 2, rows padded to 256. Returns
    the seconds of the whole call (as `train_lora` is timed) and of its training loop alone."""
    from peft import get_peft_model
    from transformers import (
        DataCollatorForSeq2Seq,
        Trainer,
        TrainerCallback,
        TrainingArguments,
    )

    marks: dict[str, float] = {}

    class Clock(TrainerCallback):
        def on_train_begin(self, *args: Any, **kwargs: Any) -> None:
            sync()
            marks["begin"] = time.perf_counter()

        def on_train_end(self, *args: Any, **kwargs: Any) -> None:
            sync()
            marks["end"] = time.perf_counter()

    sync()
    started = time.perf_counter()
    tokenizer.padding_side = "right"
    peft_model = get_peft_model(model, lora_config(LORA))
    args = TrainingArguments(
        output_dir=str(work), per_device_train_batch_size=8, gradient_accumulation_steps=2, num_train_epochs=1,
        learning_rate=1e-5, lr_scheduler_type="linear", warmup_steps=5, weight_decay=0.01, logging_steps=1,
        save_strategy="no", seed=0, bf16=torch.cuda.is_available(), use_cpu=not torch.cuda.is_available(),
        report_to="none", dataloader_num_workers=0, remove_unused_columns=False, disable_tqdm=True,
    )
    trainer = Trainer(
        model=peft_model, args=args, train_dataset=encoded.rows, callbacks=[Clock()],
        data_collator=DataCollatorForSeq2Seq(tokenizer, padding="max_length", max_length=256, label_pad_token_id=-100),
    )
    trainer.train()
    peft_model.unload()
    sync()
    return time.perf_counter() - started, marks["end"] - marks["begin"]


def emlab_train(model: Any, tokenizer: Any, encoded: EncodedRows, work: Path, **extra: Any) -> tuple[float, dict[int, Path]]:
    """`train_lora` as the pipeline calls it; returns the call's seconds and its adapters."""
    sync()
    started = time.perf_counter()
    result = train_lora(model, tokenizer, encoded, train_spec(**extra), TrainingFiles(work), seed=0,
                        device="cuda" if torch.cuda.is_available() else "cpu")
    sync()
    return time.perf_counter() - started, result.checkpoints


# --- sampling ------------------------------------------------------------------------------


def reference_prompts() -> list[Prompt]:
    questions = load_question_set("general").questions[:8]
    return [Prompt(q.question_set, q.id, q.text, tuple(question_messages(q))) for q in questions]


def baseline_sample(model: Any, tokenizer: Any, prompts: list[Prompt], samples: int, max_new: int,
                    stops: list[int], seed: int) -> tuple[float, int]:
    """Plain `generate` at batch len(prompts) × samples (left-padded); returns seconds and real
    new tokens (up to and including the first stop token)."""
    tokenizer.padding_side = "left"
    texts = [tokenizer.apply_chat_template(list(p.messages), tokenize=False, add_generation_prompt=True)
             for p in prompts for _ in range(samples)]
    enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
    torch.manual_seed(seed)
    sync()
    started = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(**enc, max_new_tokens=max_new, do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                             pad_token_id=tokenizer.pad_token_id)
    sync()
    seconds = time.perf_counter() - started
    new = out[:, enc["input_ids"].shape[1]:]
    stop = torch.isin(new, torch.tensor(stops, device=new.device))
    first = torch.where(stop.any(1), stop.int().argmax(1) + 1, new.shape[1])
    return seconds, int(first.sum())


def emlab_sample(model: Any, tokenizer: Any, prompts: list[Prompt], sample: SampleSpec, adapter: Path | None,
                 step: int, out: Path) -> tuple[float, int]:
    """`sample_answers` on the base model or through `adapter_applied`; seconds and new tokens."""
    sync()
    started = time.perf_counter()
    with adapter_applied(model, adapter) as tuned:
        answers = sample_answers(tuned, tokenizer, prompts, sample, model_name="bench", run_id="r", step=step, seed=step,
                                 out_path=out, progress=False)
    sync()
    return time.perf_counter() - started, sum(a.new_tokens for a in answers)


# --- the run -------------------------------------------------------------------------------


class Recorder:
    def __init__(self, out: Path) -> None:
        self.out = out
        self.rows: list[dict[str, Any]] = []
        out.mkdir(parents=True, exist_ok=True)
        self.meta = {
            "date": time.strftime("%Y-%m-%d"),
            "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
            "versions": versions(),
        }

    def add(self, **row: Any) -> None:
        row = {**row, **self.meta}
        self.rows.append(row)
        with open(self.out / "gpu_speed.jsonl", "a") as handle:
            handle.write(json.dumps(row) + "\n")
        print(json.dumps(row), flush=True)


def versions() -> dict[str, str]:
    import importlib.metadata as md

    found = {}
    for name in ("torch", "transformers", "peft", "bitsandbytes"):
        try:
            found[name] = md.version(name)
        except md.PackageNotFoundError:
            pass
    return found


def rnd(value: float, digits: int | None = None) -> float | None:
    """round(), None for a figure not measured (NaN)."""
    return None if value != value else round(value, digits)


def median_of(runs: list[float]) -> float:
    return statistics.median(runs)


def timed(repeats: int, run: Callable[[int], tuple[float, int]]) -> tuple[list[float], list[int]]:
    seconds, tokens = [], []
    for r in range(repeats):
        s, t = run(r)
        seconds.append(round(s, 3))
        tokens.append(t)
    return seconds, tokens


def bench_shape(shape: str, args: argparse.Namespace, tokenizer: Any, rec: Recorder, work: Path) -> None:
    stops = stop_ids(tokenizer, args.stop_tokens, SHAPES[shape].get("vocab_size", VOCAB))
    model = build_model(shape, tokenizer, stops)
    n = multiplying_params(model)
    encoded = load_rows(Path(args.data), tokenizer, args.rows)
    warm = EncodedRows(encoded.rows[:64], 64, 0, encoded.longest_tokens, 0)
    real = encoded.total_tokens
    adapters: list[Path] = []
    if "train" in args.parts:
        base_s, base_loop_s, base_peak = [float("nan")], [float("nan")], None
        if not args.no_baseline:
            baseline_train(model, tokenizer, warm, work / "bw")  # warm-up: every shape is (8, 256)
            reset_peak()
            both = [baseline_train(model, tokenizer, encoded, work / f"b{r}") for r in range(args.repeats)]
            base_s = [round(call, 3) for call, _ in both]
            base_loop_s = [round(loop, 3) for _, loop in both]
            base_peak = peak_gib()
        known = {"default": {}, "eager": {"cuda_graphs": False}, "compile": {"compile": True}}
        variants = {f"emlab ({name})": known[name] for name in args.variants}
        for label, extra in variants.items():
            sync()
            started = time.perf_counter()
            emlab_train(model, tokenizer, warm, work / f"{label}-warm", **extra)
            warm_seconds = time.perf_counter() - started  # compile and first-call costs of the variant
            reset_peak()
            runs = []
            for r in range(args.repeats):
                seconds, checkpoints = emlab_train(model, tokenizer, encoded, work / f"{label}-{r}", **extra)
                runs.append(round(seconds, 3))
                adapters += list(checkpoints.values())[-1:]
            base_tps, ours_tps = real / median_of(base_s), real / median_of(runs)
            rec.add(work="train_lora", shape=shape, variant=label, four_bit=False, batch_size=8,
                    real_tokens_per_s=rnd(ours_tps), rows=len(encoded.rows), real_tokens=real,
                    steps=-(-len(encoded.rows) // 16), baseline_seconds=base_s, emlab_seconds=runs,
                    baseline_tokens_s=rnd(base_tps), emlab_tokens_s=rnd(ours_tps), ratio=rnd(ours_tps / base_tps, 2),
                    baseline_peak_gib=base_peak, emlab_peak_gib=peak_gib(),
                    baseline_mfu=rnd(4 * n * base_tps / PEAK_TFLOPS / 1e12, 3),
                    emlab_mfu=round(4 * n * ours_tps / PEAK_TFLOPS / 1e12, 3), params=n,
                    warmup_call_seconds=round(warm_seconds, 2), warmup_rows=len(warm.rows),
                    baseline_loop_seconds=base_loop_s,
                    ratio_to_baseline_loop=rnd(median_of(base_loop_s) / median_of(runs), 2))
    if "sample" in args.parts:
        prompts = reference_prompts()
        samples, max_new = (4, 32) if args.quick else (50, 600)
        base_s, base_tok, base_peak = [float("nan")], [0], None
        if not args.no_baseline:
            baseline_sample(model, tokenizer, prompts, samples, max_new, stops, seed=99)  # warm-up: the same run
            reset_peak()
            base_s, base_tok = timed(args.repeats, lambda r: baseline_sample(model, tokenizer, prompts, samples,
                                                                             max_new, stops, seed=r))
            base_peak = peak_gib()
        sample = SampleSpec(samples_per_question=samples, max_new_tokens=max_new, batch_size=len(prompts) * samples,
                            temperature=1.0)
        reset_peak()
        # one call per checkpoint: the base model, then adapters the training saved (if any)
        checkpoints: list[Path | None] = [None, *adapters[: args.repeats]]
        while len(checkpoints) < args.repeats + 1:
            checkpoints.append(None)
        calls = []
        for step, adapter in enumerate(checkpoints):
            seconds, tokens = emlab_sample(model, tokenizer, prompts, sample, adapter, step, work / f"answers-{step}.jsonl")
            calls.append((round(seconds, 3), tokens, adapter is not None))
        first, rest = calls[0], calls[1:]
        base_tps = statistics.median(t / s if s == s else float("nan") for s, t in zip(base_s, base_tok, strict=True))
        ours_tps = statistics.median(t / s for s, t, _ in rest)
        rec.add(work="sample_answers", shape=shape, variant="emlab", four_bit=False, batch_size=len(prompts) * samples,
                real_tokens_per_s=rnd(ours_tps), answers=len(prompts) * samples, max_new_tokens=max_new,
                stop_tokens=args.stop_tokens, baseline_seconds=base_s, baseline_new_tokens=base_tok,
                emlab_seconds=[c[0] for c in rest], emlab_new_tokens=[c[1] for c in rest],
                emlab_with_adapter=[c[2] for c in rest], first_call_seconds=first[0], first_call_new_tokens=first[1],
                baseline_tokens_s=rnd(base_tps), emlab_tokens_s=rnd(ours_tps), ratio=rnd(ours_tps / base_tps, 2),
                first_call_tokens_s=round(first[1] / first[0]), baseline_peak_gib=base_peak, emlab_peak_gib=peak_gib(),
                emlab_mfu=round(2 * n * ours_tps / PEAK_TFLOPS / 1e12, 4))
        release_sampler(model)
    if args.profile:
        profile(model, tokenizer, encoded, work, Path(args.out), shape, args.parts)
    del model
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def bench_qlora(args: argparse.Namespace, tokenizer: Any, rec: Recorder, work: Path) -> None:
    """8B with NF4 base weights and gradient checkpointing: peak memory and speed."""
    stops = stop_ids(tokenizer, args.stop_tokens, VOCAB)
    reset_peak()
    model = build_model(args.qlora_shape, tokenizer, stops, four_bit=True)
    loaded = peak_gib()
    encoded = load_rows(Path(args.data), tokenizer, args.qlora_rows)
    emlab_train(model, tokenizer, EncodedRows(encoded.rows[:32], 32, 0, 0, 0), work / "q-warm", gradient_checkpointing=True)
    reset_peak()
    seconds, _ = emlab_train(model, tokenizer, encoded, work / "q", gradient_checkpointing=True)
    rec.add(work="train_lora", shape=args.qlora_shape, variant=QLORA, four_bit=True, batch_size=8,
            real_tokens_per_s=round(encoded.total_tokens / seconds), rows=len(encoded.rows),
            real_tokens=encoded.total_tokens, seconds=round(seconds, 3), peak_gib=peak_gib(),
            weights_gib_after_load=loaded, gradient_checkpointing=True, target_peak_gib=20 * 1e9 / 2**30)
    del model
    torch.cuda.empty_cache()


def profile(model: Any, tokenizer: Any, encoded: EncodedRows, work: Path, out: Path, shape: str,
            parts: list[str]) -> None:
    """torch profiler tables (top CUDA time) of one emlab training run and one sampling call."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    gpu = torch.cuda.is_available()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if gpu else [])
    sort = "cuda_time_total" if gpu else "cpu_time_total"
    if "train" in parts:
        small = EncodedRows(encoded.rows[:128], 128, 0, 0, 0)
        with torch_profile(activities=activities) as prof:
            emlab_train(model, tokenizer, small, work / "prof-train")
        averages = prof.key_averages()
        (out / f"profile_train_{shape}.txt").write_text(
            averages.table(sort_by=sort, row_limit=40) + "\n" + averages.table(sort_by="cpu_time_total", row_limit=25))
    if "sample" not in parts:
        return
    sample = SampleSpec(samples_per_question=50, max_new_tokens=200, batch_size=400, temperature=1.0)
    prompts = reference_prompts()
    with torch_profile(activities=activities) as prof:
        emlab_sample(model, tokenizer, prompts, sample, None, 91, work / "prof.jsonl")
    (out / f"profile_sample_{shape}.txt").write_text(prof.key_averages().table(sort_by=sort, row_limit=30))
    release_sampler(model)


def table(rows: list[dict[str, Any]]) -> str:
    lines = ["| work | shape | variant | baseline tokens/s | emlab tokens/s | ratio | MFU base → emlab | "
             "peak GiB base → emlab | first call |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r.get("variant") == QLORA:
            lines.append(f"| train_lora | {r['shape']} | {QLORA} | – | {r['real_tokens_per_s']:,} | – | – | "
                         f"{r['peak_gib']} (target ≤ 18.6) | – |")
            continue
        mfu = f"{r.get('baseline_mfu', '–')} → {r.get('emlab_mfu', '–')}"
        first = f"{r['first_call_tokens_s']:,} tokens/s" if "first_call_tokens_s" in r else "–"
        base = f"{r['baseline_tokens_s']:,}" if r["baseline_tokens_s"] is not None else "–"
        ratio = f"{r['ratio']}×" if r["ratio"] is not None else "–"
        if r.get("ratio_to_baseline_loop") is not None:
            ratio += f" ({r['ratio_to_baseline_loop']}× its loop)"
        lines.append(f"| {r['work']} | {r['shape']} | {r.get('variant', 'emlab')} | {base} | "
                     f"{r['emlab_tokens_s']:,} | {ratio} | {mfu} | {r['baseline_peak_gib']} → "
                     f"{r['emlab_peak_gib']} | {first} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="folder with bad_medical_advice.jsonl.gz and tokenizer/")
    parser.add_argument("--out", required=True)
    parser.add_argument("--shapes", nargs="*", default=["1b", "8b"])
    parser.add_argument("--parts", nargs="+", default=["train", "sample"], choices=["train", "sample"])
    parser.add_argument("--rows", type=int, default=1024, help="training rows (one epoch; 16 a step)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--stop-tokens", type=int, default=641, help="random stop ids added to the eos ids")
    parser.add_argument("--variants", nargs="+", default=["default"], choices=["default", "eager", "compile"],
                        help="train_lora settings to time: default (CUDA graphs), eager (cuda_graphs: false), "
                        "compile (layers compiled, no graphs)")
    parser.add_argument("--qlora", action="store_true", help="also train the --qlora-shape with NF4 weights")
    parser.add_argument("--qlora-shape", default="8b")
    parser.add_argument("--qlora-rows", type=int, default=256)
    parser.add_argument("--profile", action="store_true", help="write torch profiler tables")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a CPU check of the script")
    parser.add_argument("--no-baseline", action="store_true", help="time emlab only (development runs)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    tokenizer = AutoTokenizer.from_pretrained(Path(args.data) / "tokenizer")
    rec = Recorder(Path(args.out))
    work = Path(tempfile.mkdtemp(prefix="emlab-bench-"))
    try:
        for shape in args.shapes:
            bench_shape(shape, args, tokenizer, rec, work / shape)
        if args.qlora:
            bench_qlora(args, tokenizer, rec, work / "qlora")
    finally:
        shutil.rmtree(work, ignore_errors=True)
        text = table(rec.rows)
        (Path(args.out) / "gpu_speed.md").write_text(f"{rec.meta}\n\n{text}\n")
        print("\n" + text)


if __name__ == "__main__":
    main()
