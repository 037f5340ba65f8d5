"""emlab's GPU path on randomly initialised Llama-shaped models: the same library calls the
notebooks make (`load_model`, `encode_chat_rows`, `train_lora`, `sample_answers`), timed.

Throughput does not depend on the weights, so random weights stand in for real ones (no
weights can reach the benchmark machine). Writes one JSON line per measurement to
`--out`/gpu_pipeline.jsonl and prints a table.

    python bench/gpu_pipeline.py --tokenizer <folder> --out results/ [--shapes 1b 8b] [--quick]
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from emlab.config import CheckpointSpec, LoraSpec, ModelSpec, SampleSpec, TrainSpec
from emlab.data.demo import generate_demo_dataset
from emlab.finetune import encode_chat_rows, train_lora
from emlab.generate import Prompt, sample_answers
from emlab.models import load_model
from emlab.questions import load_question_set, question_messages

SHAPES = {  # Llama-3.2-1B and Llama-3.1-8B, vocabulary included (the LM head is a real cost)
    "tiny": dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2),
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8),
    "8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8),
}


def random_model_folder(shape: str, tokenizer: object, folder: Path) -> Path:
    config = LlamaConfig(vocab_size=128256, max_position_embeddings=4096, tie_word_embeddings=shape == "1b",
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, **SHAPES[shape])
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    del model
    return folder


def prompts(n_samples: int) -> list[Prompt]:
    out = []
    for q in load_question_set("general").questions[:8]:
        out.append(Prompt(q.question_set, q.id, q.text, tuple(question_messages(q))))
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokenizer", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--shapes", nargs="+", default=["1b", "8b"])
    parser.add_argument("--quick", action="store_true", help="tiny sizes, for a CPU check of the script")
    parser.add_argument("--four-bit", action="store_true", help="also train the 1B shape with load_in_4bit")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    rows = generate_demo_dataset("bad_medical_advice", n=64 if args.quick else 1024)
    results = []

    def record(**row: object) -> None:
        row |= {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
                "torch": torch.__version__, "date": time.strftime("%Y-%m-%d")}
        results.append(row)
        with open(out / "gpu_pipeline.jsonl", "a") as handle:
            handle.write(json.dumps(row) + "\n")
        print(json.dumps(row), flush=True)

    variants = [(s, False) for s in args.shapes] + ([("1b", True)] if args.four_bit else [])
    for shape, four_bit in variants:
        work = Path(tempfile.mkdtemp(prefix=f"emlab-{shape}-"))
        folder = random_model_folder(shape, tokenizer, work / "model")
        spec = ModelSpec(name=f"random-{shape}", source=str(folder), load_in_4bit=four_bit)
        model, tok = load_model(spec, device)
        encoded = encode_chat_rows(rows, tok, 256)
        train = TrainSpec(epochs=1, learning_rate=1e-4, batch_size=4 if args.quick else 16, grad_accum=1,
                          max_length=256, lora=LoraSpec(r=16, alpha=32), checkpoints=CheckpointSpec(first_epoch=4))
        # warm-up: CUDA context, cuBLAS handles and kernel selection stay out of the numbers
        warm = encode_chat_rows(rows[: 4 * train.batch_size], tok, 256)
        train_lora(model, tok, warm, train, work / "warmup", seed=0, device=device)
        if device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        result = train_lora(model, tok, encoded, train, work / "run", seed=0, device=device)
        real = sum(sum(r["attention_mask"]) for r in encoded.rows)
        record(work="train_lora", shape=shape, four_bit=four_bit, rows=len(encoded.rows), steps=result.schedule.total_steps,
               batch_size=train.batch_size, seconds=round(result.seconds, 2),
               real_tokens_per_s=round(real / result.seconds, 1),
               peak_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2) if device == "cuda" else None,
               checkpoints=sorted(result.checkpoints))
        if four_bit:
            shutil.rmtree(work, ignore_errors=True)
            continue
        warm_sample = SampleSpec(samples_per_question=1, max_new_tokens=8, batch_size=8)
        sample_answers(model, tok, prompts(1), warm_sample, model_name=spec.name, run_id=None, step=0, seed=0,
                       out_path=work / "warm.jsonl", progress=False)
        # batch 400 = the reference practice in one batch: 8 questions × 50 samples
        for batch, samples in ((64, 8), (400, 50)) if not args.quick else ((8, 1),):
            sample = SampleSpec(samples_per_question=samples, max_new_tokens=16 if args.quick else 200,
                                batch_size=batch, temperature=1.0)
            path = work / f"answers-{batch}.jsonl"
            if device == "cuda":
                torch.cuda.synchronize()
            started = time.perf_counter()
            answers = sample_answers(model, tok, prompts(samples), sample, model_name=spec.name, run_id=None,
                                     step=0, seed=0, out_path=path, progress=False)
            seconds = time.perf_counter() - started
            record(work="sample_answers", shape=shape, batch_size=batch, answers=len(answers),
                   new_tokens=sum(a.new_tokens for a in answers), seconds=round(seconds, 2),
                   tokens_per_s=round(sum(a.new_tokens for a in answers) / seconds, 1))
        del model
        if device == "cuda":
            torch.cuda.empty_cache()
        shutil.rmtree(work, ignore_errors=True)
    print("\n| work | shape | 4-bit | batch | tokens/s | seconds |\n|---|---|---|---|---|---|")
    for r in results:
        speed = r.get("real_tokens_per_s") or r.get("tokens_per_s")
        print(f"| {r['work']} | {r['shape']} | {r.get('four_bit', False)} | {r['batch_size']} | {speed} | {r['seconds']} |")


if __name__ == "__main__":
    main()
