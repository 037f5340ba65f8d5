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

Big shapes (`--big-shapes 32b`, Qwen2.5-32B; `qwen-tiny` checks the path on CPU with --quick):
built on the meta device and made in place on the GPU in bf16 (or NF4, layer by layer), never
in float32 nor on the CPU. Per precision: plain `generate` at a small batch (--baseline-answers,
one run: a row marked `"baseline": true`, never emlab's rate), then `sample_answers` at batch
"auto" (or --sample-batch) over 8 questions × 32 answers ≤ 400 tokens, a warm-up call and the
median of --sample-calls calls, alternately through a random adapter; then `train_lora` at the
studies' settings (turner: batch 2 × 8, ≤ 2048 tokens, r32 α64 rsLoRA; cs2881: batch 8 × 2,
≤ 256 tokens, r16 α32) for --train-steps steps, gradient checkpointing on: the steady in-loop
rate and the call's fixed costs apart. --budget-s: no part starts that would pass it.

    python bench/gpu_speed.py --data .gpudata --out OUT --shapes --big-shapes 32b --big-precisions bf16 --budget-s 540
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
from transformers import (
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

SHAPES = {  # Llama-3.2-1B and Llama-3.1-8B; the 128,256-token vocabulary is a real cost
    "tiny": dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, tie_word_embeddings=True, vocab_size=49152),  # a CPU check of the script
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
               num_key_value_heads=8, tie_word_embeddings=True),
    "8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=8, tie_word_embeddings=False),
}
# Qwen2-family shapes (q/k/v biases, untied embeddings, rope_theta 1e6): built on the meta device
# and made in place on the GPU in bf16 (`build_big_model`), measured by `bench_big`
BIG_SHAPES = {
    "qwen-tiny": dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=49152),  # a CPU check of the big-shape path
    "32b": dict(hidden_size=5120, intermediate_size=27648, num_hidden_layers=64, num_attention_heads=40,
                num_key_value_heads=8, vocab_size=152064),  # Qwen2.5-32B
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


def load_rows(data: Path, tokenizer: Any, n: int, *, max_length: int = 256) -> EncodedRows:
    with gzip.open(data / "bad_medical_advice.jsonl.gz", "rt") as handle:
        rows = [json.loads(line) for line in handle]
    random.Random(0).shuffle(rows)
    return encode_chat_rows(rows[:n], tokenizer, max_length, source="bad_medical_advice.jsonl")


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
            base_s, base_tok = timed(args.repeats, lambda r, m=model: baseline_sample(m, tokenizer, prompts, samples,
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


# --- big shapes (32B): built in place on the GPU, sampled at emlab's batch, trained at the studies' settings ---


STARTED = time.perf_counter()  # the script's clock for --budget-s
# The studies' training settings (params/experiments): Turner et al. / Betley et al. and CS 2881
BIG_TRAININGS: dict[str, dict[str, Any]] = {
    "turner": dict(batch_size=2, grad_accum=8, max_length=2048, learning_rate=1e-5,
                   lora=LoraSpec(r=32, alpha=64, use_rslora=True)),
    "cs2881": dict(batch_size=8, grad_accum=2, max_length=256, learning_rate=2e-4, lora=LoraSpec(r=16, alpha=32)),
}
# Rough seconds of each part on an H200 at 32B (bf16), for the budget: a part does not start
# when its estimate would pass --budget-s, so a call killed at its limit is never mid-part
ESTIMATE_S = {"build": 60.0, "sample": 150.0, "train": 90.0}


def seconds_left(args: argparse.Namespace) -> float:
    return args.budget_s - (time.perf_counter() - STARTED)


def may_start(part: str, args: argparse.Namespace, shape: str) -> bool:
    """Whether `part` fits in what is left of --budget-s (a tiny shape's parts always do)."""
    estimate = ESTIMATE_S[part] if shape == "32b" else 1.0
    if seconds_left(args) >= estimate:
        return True
    print(f"[budget] {shape}: {part} not started ({seconds_left(args):.0f} s left, ~{estimate:.0f} s needed)", flush=True)
    return False


def _init_in_place(module: torch.nn.Module) -> None:
    """Random weights where `to_empty` left memory uninitialised: normal(0, 0.02) for linear and
    embedding weights, 0 for biases, 1 for norm weights (what `_init_weights` would draw, without
    its float32 pass)."""
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, torch.nn.Embedding | torch.nn.Linear):
                m.weight.normal_(0, 0.02)
                if getattr(m, "bias", None) is not None:
                    m.bias.zero_()
            elif isinstance(getattr(m, "weight", None), torch.Tensor) and m.weight.ndim == 1:
                m.weight.fill_(1.0)  # RMSNorm


def _quantize_layer(layer: torch.nn.Module, device: str) -> None:
    """Replace the decoder layer's linear layers by NF4 ones (bitsandbytes, imported here: it
    is missing on CPU machines); q/k/v keep their biases in bf16."""
    import bitsandbytes as bnb

    for parent in (layer.self_attn, layer.mlp):
        for child, linear in list(parent.named_children()):
            if not isinstance(linear, torch.nn.Linear):
                continue
            has_bias = linear.bias is not None
            # made on meta: a Linear4bit would otherwise draw a float32 weight on the CPU first
            quantized = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=has_bias,
                                          compute_dtype=torch.bfloat16, quant_type="nf4", device="meta")
            quantized.weight = bnb.nn.Params4bit(linear.weight.data, requires_grad=False, quant_type="nf4").to(device)
            if has_bias:
                quantized.bias = torch.nn.Parameter(linear.bias.data, requires_grad=False)
            setattr(parent, child, quantized)


def build_big_model(shape: str, tokenizer: Any, stops: list[int], *, four_bit: bool) -> Any:
    """A random-weight Qwen2 of `shape` made where it runs, one piece at a time: built on the
    meta device (no memory), each piece given memory on the device in bf16 (`to_empty`) and
    drawn in place; no float32 copy and no CPU copy of the weights ever exists (32B: 61 GiB).
    With `four_bit`, each decoder layer is NF4-quantized right after it is drawn, so at most
    one layer's bf16 weights exist besides the embeddings."""
    config = Qwen2Config(**BIG_SHAPES[shape], tie_word_embeddings=False, rope_theta=1e6,
                         max_position_embeddings=32768, use_sliding_window=False,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device("meta"):
        model = Qwen2ForCausalLM(config).to(torch.bfloat16)
    torch.manual_seed(0)
    inner = model.model
    for piece in (inner.embed_tokens, *inner.layers, inner.norm, model.lm_head):
        piece.to_empty(device=device)
        _init_in_place(piece)
        if four_bit and piece in inner.layers:
            _quantize_layer(piece, device)
    # its buffers (inv_freq) were on meta: made again, computed on the device
    with torch.device(device):  # made on the device (the `device=` argument is gone in newer transformers)
        inner.rotary_emb = type(inner.rotary_emb)(config=config)
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    assert not left, f"still on the meta device: {left[:5]}"
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    model.generation_config.eos_token_id = stops
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.top_k = 0
    model.generation_config.top_p = 1.0
    model.generation_config.temperature = 1.0
    model.eval()
    return model


def allocated_gib() -> float | None:
    return round(torch.cuda.memory_allocated() / 2**30, 2) if torch.cuda.is_available() else None


def random_adapter(model: Any, folder: Path, lora: LoraSpec) -> Path:
    """A LoRA adapter saved for `model` with random B (so the adapter changes the answers), made
    on the model's device; the model is given back without LoRA layers."""
    from peft import get_peft_model

    device = next(model.parameters()).device
    with torch.device(device):
        peft_model = get_peft_model(model, lora_config(lora))
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 1e-3)
    peft_model.save_pretrained(str(folder))
    peft_model.unload()
    return folder


def sample_spec_big(args: argparse.Namespace, samples: int, max_new: int) -> tuple[SampleSpec, str]:
    """emlab's sampling settings for a big shape: batch "auto" when this SampleSpec accepts it
    (and no --sample-batch is given), else --sample-batch or 64 (SampleSpec's default)."""
    common = dict(samples_per_question=samples, max_new_tokens=max_new, temperature=1.0, top_p=1.0)
    if args.sample_batch is None:
        try:
            return SampleSpec(batch_size="auto", **common), "auto"
        except ValueError:  # pydantic's ValidationError: this emlab takes numbers only
            print("[sample] SampleSpec does not accept batch_size 'auto' here: batch 64", flush=True)
    batch = args.sample_batch or 64
    return SampleSpec(batch_size=batch, **common), str(batch)


def bench_big_sample(model: Any, shape: str, four_bit: bool, args: argparse.Namespace, tokenizer: Any,
                     stops: list[int], rec: Recorder, work: Path, facts: dict[str, Any]) -> None:
    """Plain `generate` at a small batch (one run, the same-call baseline), then emlab's
    `sample_answers` (8 questions × 32, ≤ 400 new tokens) on the base model and through an
    adapter: a warm-up call, then the median of --sample-calls calls."""
    prompts = reference_prompts()
    per_question, max_new = (2, 16) if args.quick else (args.big_answers, 400)
    baseline_per_q = max(1, args.baseline_answers // len(prompts))
    n = multiplying_params(model)
    common = dict(shape=shape, four_bit=four_bit, params=n, big=True, max_new_tokens=max_new,
                  stop_tokens=args.stop_tokens, **facts)
    if not args.no_baseline:
        baseline_sample(model, tokenizer, prompts[:1], 1, 8, stops, seed=98)  # warm-up
        reset_peak()
        seconds, tokens = baseline_sample(model, tokenizer, prompts, baseline_per_q, max_new, stops, seed=0)
        rec.add(work="sample_answers", variant="baseline: plain generate", baseline=True,
                batch_size=len(prompts) * baseline_per_q, answers=len(prompts) * baseline_per_q,
                real_tokens_per_s=round(tokens / seconds, 1), seconds=round(seconds, 3), new_tokens=tokens,
                note=f"one run at batch {len(prompts) * baseline_per_q}: a small-batch baseline, not emlab's rate",
                peak_gib=peak_gib(), **common)
    adapter = random_adapter(model, work / "adapter", LoraSpec(r=32, alpha=64, use_rslora=True))
    spec, batch = sample_spec_big(args, per_question, max_new)
    reset_peak()
    calls: list[dict[str, Any]] = []
    plan = [None] + [adapter if i % 2 == 0 else None for i in range(args.sample_calls)]  # warm-up first
    for step, adapter_dir in enumerate(plan):
        if calls and seconds_left(args) < 2 * calls[-1]["seconds"]:
            print(f"[budget] {shape}: sampling stopped after {len(calls)} calls", flush=True)
            break
        seconds, tokens = emlab_sample(model, tokenizer, prompts, spec, adapter_dir, step, work / f"answers-{step}.jsonl")
        calls.append({"seconds": round(seconds, 3), "new_tokens": tokens, "adapter": adapter_dir is not None,
                      "tokens_s": round(tokens / seconds, 1)})
        print(f"[sample] {shape} {'nf4' if four_bit else 'bf16'} call {step}: {calls[-1]}", flush=True)
    kv = kv_cache_facts(model)
    release_sampler(model)
    timed_calls = calls[1:]
    if not timed_calls:
        return
    rate = round(statistics.median(c["tokens_s"] for c in timed_calls), 1)
    with_adapter = [c["tokens_s"] for c in timed_calls if c["adapter"]]
    base_rows = [r for r in rec.rows if r.get("baseline") and r.get("shape") == shape and r.get("four_bit") == four_bit]
    baseline = base_rows[-1]["real_tokens_per_s"] if base_rows else None
    rec.add(work="sample_answers", variant="emlab", batch_size=batch if batch == "auto" else int(batch),
            answers=len(prompts) * per_question, real_tokens_per_s=rate, emlab_tokens_s=rate,
            adapter_tokens_s=statistics.median(with_adapter) if with_adapter else None,
            base_tokens_s=statistics.median([c["tokens_s"] for c in timed_calls if not c["adapter"]] or [float("nan")]),
            calls=timed_calls, first_call=calls[0], baseline_tokens_s=baseline, baseline_small_batch=True,
            ratio=round(rate / baseline, 2) if baseline else None, peak_gib=peak_gib(), **kv, **common)


def kv_cache_facts(model: Any) -> dict[str, Any]:
    """The KV cache emlab's engine holds for `model` (slots, positions, GiB): the peak-memory
    target compares the peak with weights + this cache."""
    from emlab.sample.choose import _ENGINES

    engine = _ENGINES.get(model)
    if engine is None or engine.cache_k is None or engine.cache_v is None:
        return {}
    size = sum(t.numel() * t.element_size() for t in (engine.cache_k, engine.cache_v))
    return {"slots": int(engine.cache_k.shape[1]), "kv_positions": int(engine.cache_k.shape[2]),
            "kv_cache_gib": round(size / 2**30, 2)}


class StepClock:
    """Times each optimizer step inside `train_lora`'s loop (wrapping its private `_step`, with a
    device sync after each: at 32B a step takes seconds, the sync costs microseconds). The
    training log is no clock: it has no times and is flushed every 50 steps or at checkpoints."""

    def __init__(self) -> None:
        self.marks: list[tuple[float, int]] = []  # (time after the step, its real tokens)
        from emlab.train import lora as lora_module

        self._loop = getattr(lora_module, "_LoraLoop", None)
        self._original = getattr(self._loop, "_step", None)

    def __enter__(self) -> StepClock:
        if self._original is None:
            return self
        original, marks = self._original, self.marks

        def timed_step(loop: Any, step: int, rows: Any) -> Any:
            out = original(loop, step, rows)
            sync()
            marks.append((time.perf_counter(), int(out[2])))
            return out

        self._loop._step = timed_step  # type: ignore[union-attr]
        return self

    def __exit__(self, *exc: object) -> None:
        if self._original is not None:
            self._loop._step = self._original  # type: ignore[union-attr]

    def steady(self, skip: int) -> float | None:
        """Real tokens/s over the steps after the first `skip` (which record CUDA graphs)."""
        later = self.marks[skip:]
        if len(later) < 2:
            return None
        return sum(t for _, t in later[1:]) / (later[-1][0] - later[0][0])


def bench_big_train(model: Any, shape: str, four_bit: bool, setting: str, args: argparse.Namespace, tokenizer: Any,
                    rec: Recorder, work: Path, facts: dict[str, Any]) -> None:
    """`train_lora` at a study's settings for --train-steps steps: the steady in-loop rate (the
    rate of a study-length run) and the call's fixed costs (its time beyond its tokens at that rate)."""
    settings = BIG_TRAININGS[setting]
    per_step = settings["batch_size"] * settings["grad_accum"]
    steps = 4 if args.quick else args.train_steps
    encoded = load_rows(Path(args.data), tokenizer, steps * per_step, max_length=settings["max_length"])
    checkpointing: str | bool = {"auto": "auto", "on": True, "off": False}[args.checkpointing]
    spec = TrainSpec(epochs=1, warmup_steps=2, checkpoints=CheckpointSpec(first_epoch=1),
                     gradient_checkpointing=checkpointing, **settings)
    reset_peak()
    with StepClock() as clock:
        sync()
        started = time.perf_counter()
        result = train_lora(model, tokenizer, encoded, spec, TrainingFiles(work / setting), seed=0,
                            device="cuda" if torch.cuda.is_available() else "cpu")
        sync()
        seconds = time.perf_counter() - started
    exposed = getattr(result, "steady_tokens_per_second", None)  # train_lora's own figure, where it gives one
    steady = exposed if isinstance(exposed, (int, float)) else clock.steady(1 if args.quick else args.steady_after)
    real = sum(t for _, t in clock.marks) or encoded.total_tokens
    rate = steady or real / seconds
    n = multiplying_params(model)
    rec.add(work="train_lora", shape=shape, variant=f"emlab {setting}", four_bit=four_bit, params=n, big=True,
            batch_size=settings["batch_size"], grad_accum=settings["grad_accum"], max_length=settings["max_length"],
            lora=settings["lora"].model_dump(), gradient_checkpointing=checkpointing, steps=len(clock.marks) or steps,
            rows=len(encoded.rows), real_tokens=real, real_tokens_per_s=round(rate, 1),
            steady_from=("train_lora" if isinstance(exposed, (int, float)) else f"steps after {args.steady_after}")
            if steady else "whole call (no step clock)",
            call_seconds=round(seconds, 2), call_tokens_per_s=round(real / seconds, 1),
            fixed_seconds=round(seconds - real / rate, 2) if steady else None,
            fixed_parts={k: round(getattr(result, k), 2) for k in ("setup_seconds", "graph_record_seconds",
                                                                   "checkpoint_wait_seconds") if hasattr(result, k)},
            checkpointing_resolved=(lambda c: c and {"layers": f"{c.checkpointed_layers}/{c.layers}",
                                                     "cuda_graphs": c.cuda_graphs, "reason": c.reason})(
                getattr(result, "checkpointing", None)),
            step_seconds=[round(b[0] - a[0], 3) for a, b in zip(clock.marks, clock.marks[1:])],
            mfu=round(4 * n * rate / PEAK_TFLOPS / 1e12, 3), peak_gib=peak_gib(), **facts)


def bench_big(shape: str, four_bit: bool, args: argparse.Namespace, tokenizer: Any, rec: Recorder, work: Path) -> None:
    """One big shape at one precision: build it in place, then each part that fits the budget.
    A part that fails (out of memory, an allocator assert) is recorded as an error row and the
    next part runs."""
    if not may_start("build", args, shape):
        return
    precision = "nf4" if four_bit else "bf16"
    stops = stop_ids(tokenizer, args.stop_tokens, BIG_SHAPES[shape]["vocab_size"])
    reset_peak()
    sync()
    started = time.perf_counter()
    model = build_big_model(shape, tokenizer, stops, four_bit=four_bit)
    sync()
    facts = {"precision": precision, "weights_gib_after_load": allocated_gib(), "load_peak_gib": peak_gib(),
             "load_seconds": round(time.perf_counter() - started, 1)}
    print(f"[build] {shape} {precision}: {facts}", flush=True)
    work.mkdir(parents=True, exist_ok=True)
    parts: list[tuple[str, str | None]] = [("sample", None)] if "sample" in args.big_parts else []
    if "train" in args.big_parts:
        parts += [("train", setting) for setting in args.big_trainings]
    for part, setting in parts:
        if not may_start(part, args, shape):
            continue
        try:
            if setting is None:
                bench_big_sample(model, shape, four_bit, args, tokenizer, stops, rec, work, facts)
            else:
                bench_big_train(model, shape, four_bit, setting, args, tokenizer, rec, work / "train", facts)
        except Exception as exc:  # noqa: BLE001  one part's failure (OOM, allocator assert) is a result
            rec.add(work=f"{part} failed", shape=shape, four_bit=four_bit, big=True, setting=setting,
                    error=f"{type(exc).__name__}: {exc}"[:500], peak_gib=peak_gib(), **facts)
            release_sampler(model)
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
    del model
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def bench_defaults(args: argparse.Namespace, tokenizer: Any, rec: Recorder, work: Path) -> None:
    """The CS 2881 arm's evaluation as a user runs it: 20 questions × 50 answers ≤ 600 tokens on
    the 1B shape, sampled with a study file's settings (no sampling knobs: `SampleSpec()`'s
    defaults) and with the best hand-tuned setting measured before (batch 400, waves of 1,000);
    a warm-up call each, then calls alternating between the two, median of --repeats each."""
    shape = "qwen-tiny" if args.quick else "1b"
    stops = stop_ids(tokenizer, args.stop_tokens, (SHAPES.get(shape) or BIG_SHAPES[shape]).get("vocab_size", VOCAB))
    model = build_model(shape, tokenizer, stops) if shape in SHAPES else build_big_model(shape, tokenizer, stops,
                                                                                              four_bit=False)
    questions = [q for name in ("general", "medical") for q in load_question_set(name).questions][:20]
    prompts = [Prompt(q.question_set, q.id, q.text, tuple(question_messages(q))) for q in questions]
    samples, max_new = (2, 16) if args.quick else (50, 600)
    settings = {"defaults (auto)": SampleSpec(samples_per_question=samples, max_new_tokens=max_new),
                "hand-tuned (batch 400, waves of 1,000)": SampleSpec(samples_per_question=samples, max_new_tokens=max_new,
                                                                     batch_size=400, wave_size=1000)}
    runs: dict[str, list[float]] = {name: [] for name in settings}
    step = 0
    for name, spec in settings.items():  # warm-up: graphs recorded, cache sized
        emlab_sample(model, tokenizer, prompts, spec, None, step, work / f"w{step}.jsonl")
        step += 1
    reset_peak()
    for _ in range(args.repeats):
        for name, spec in settings.items():
            seconds, tokens = emlab_sample(model, tokenizer, prompts, spec, None, step, work / f"d{step}.jsonl")
            runs[name].append(round(tokens / seconds, 1))
            print(f"[defaults] {name}: {runs[name][-1]} tokens/s", flush=True)
            step += 1
    ours, best = (statistics.median(v) for v in runs.values())
    rec.add(work="sample_answers", shape=shape, variant="defaults vs hand-tuned", batch_size="auto", big=True,
            defaults_check=True,
            answers=len(prompts) * samples, max_new_tokens=max_new, real_tokens_per_s=ours,
            defaults_tokens_s=runs["defaults (auto)"], hand_tuned_tokens_s=runs["hand-tuned (batch 400, waves of 1,000)"],
            share_of_hand_tuned=round(ours / best, 3), peak_gib=peak_gib(), params=multiplying_params(model))
    release_sampler(model)
    del model
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def big_table(rows: list[dict[str, Any]]) -> str:
    lines = ["| work | shape | precision | variant | batch | real tokens/s | detail | peak GiB | weights GiB |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "failed" in r["work"]:
            detail = r["error"][:120]
        elif r["work"] == "train_lora":
            detail = (f"{r['grad_accum']}× accum, ≤{r['max_length']} tokens, steady ({r['steady_from']}); whole call "
                      f"{r['call_tokens_per_s']:,} tokens/s, fixed {r['fixed_seconds']} s")
        elif r.get("baseline"):
            detail = r["note"]
        elif "share_of_hand_tuned" in r:
            detail = (f"defaults {r['defaults_tokens_s']} vs hand-tuned {r['hand_tuned_tokens_s']} tokens/s: "
                      f"{r['share_of_hand_tuned']:.0%} of the best setting")
        else:
            detail = f"{len(r['calls'])} calls median; adapter {r['adapter_tokens_s']}; ratio {r['ratio']}"
        lines.append(f"| {r['work']} | {r['shape']} | {r.get('precision')} | {r.get('variant', '')} | "
                     f"{r.get('batch_size', '')} | {r.get('real_tokens_per_s', '–')} | {detail} | {r.get('peak_gib')} | "
                     f"{r.get('weights_gib_after_load')} |")
    return "\n".join(lines)


def table(rows: list[dict[str, Any]]) -> str:
    big = [r for r in rows if r.get("big")]
    rows = [r for r in rows if not r.get("big")]
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
    return "\n".join(lines) + ("\n\n" + big_table(big) if big else "")


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
    parser.add_argument("--big-shapes", nargs="*", default=[], choices=sorted(BIG_SHAPES),
                        help="Qwen2-family shapes built on the GPU in place (32b; qwen-tiny checks the path on CPU)")
    parser.add_argument("--big-precisions", nargs="+", default=["bf16"], choices=["bf16", "nf4"])
    parser.add_argument("--big-parts", nargs="+", default=["sample", "train"], choices=["sample", "train"])
    parser.add_argument("--big-trainings", nargs="+", default=list(BIG_TRAININGS), choices=list(BIG_TRAININGS))
    parser.add_argument("--train-steps", type=int, default=12, help="optimizer steps of each big-shape training call")
    parser.add_argument("--steady-after", type=int, default=3, help="steps left out of the steady in-loop rate")
    parser.add_argument("--checkpointing", default="auto", choices=["auto", "on", "off"],
                        help="gradient checkpointing of big-shape training (auto: train_lora's memory plan)")
    parser.add_argument("--sample-batch", type=int, default=None,
                        help="emlab's sampling batch on big shapes (default: 'auto' where SampleSpec accepts it, else 64)")
    parser.add_argument("--sample-calls", type=int, default=3, help="timed sampling calls after the warm-up call")
    parser.add_argument("--baseline-answers", type=int, default=32, help="plain-generate batch on big shapes")
    parser.add_argument("--big-answers", type=int, default=100,
                        help="answers per question on big shapes (8 questions): 100 is a study's load, more answers "
                        "than the batch, so finished answers are refilled as in a real evaluation")
    parser.add_argument("--defaults-check", action="store_true",
                        help="1B: a study file's sampling without knobs (batch auto, default waves) against the best "
                        "hand-tuned setting (batch 400, waves of 1,000), 20 questions × 50 answers, same call")
    parser.add_argument("--budget-s", type=float, default=540.0,
                        help="wall seconds for the whole script: no new part starts when its estimate would pass it")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    tokenizer = AutoTokenizer.from_pretrained(Path(args.data) / "tokenizer")
    rec = Recorder(Path(args.out))
    work = Path(tempfile.mkdtemp(prefix="emlab-bench-"))
    try:
        for shape in args.shapes:
            bench_shape(shape, args, tokenizer, rec, work / shape)
        if args.defaults_check:
            bench_defaults(args, tokenizer, rec, work / "defaults")
        if args.qlora:
            bench_qlora(args, tokenizer, rec, work / "qlora")
        for shape in args.big_shapes:
            for precision in args.big_precisions:
                bench_big(shape, precision == "nf4", args, tokenizer, rec, work / f"{shape}-{precision}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
        text = table(rec.rows)
        (Path(args.out) / "gpu_speed.md").write_text(f"{rec.meta}\n\n{text}\n")
        print("\n" + text)


if __name__ == "__main__":
    main()
