"""The GPU-only code paths against their portable references, on a random-weight Llama in
bfloat16 (marker `gpu`; skipped without CUDA). Run on the benchmark machine:

    pytest -m gpu tests/test_gpu_path.py

Tolerances are relative errors ‖out − ref‖ / ‖ref‖ for bfloat16 operands (1e-3 … 1e-2)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

BF16 = 2e-2  # relative error allowed for bfloat16 results


def _rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.float() - ref.float()).norm() / ref.float().norm()).item()


@pytest.fixture(scope="module")
def llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=4096, hidden_size=512, intermediate_size=1536, num_hidden_layers=3,
                         num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=2048,
                         tie_word_embeddings=False, eos_token_id=2, bos_token_id=1)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.config._attn_implementation = "sdpa"
    return model.eval()


@pytest.mark.parametrize("head_dim", [64, 128])
def test_varlen_flash_matches_row_by_row_sdpa_forward_and_backward(head_dim: int) -> None:
    from emlab.models.attention import causal_varlen, probe_flash

    probe_flash(torch.device("cuda"))
    lengths = [37, 200, 5, 128, 64]
    total = sum(lengths)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device="cuda")
    q = torch.randn(total, 32, head_dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(total, 8, head_dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(total, 8, head_dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    grad = torch.randn(total, 32, head_dim, device="cuda", dtype=torch.bfloat16)
    out = causal_varlen(q, k, v, cu, max(lengths), head_dim**-0.5)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), grad)
    ref_out = []
    for start, end in zip(cu.tolist(), cu.tolist()[1:], strict=False):
        qs, ks, vs = (x.detach().float()[start:end].transpose(0, 1)[None].requires_grad_() for x in (q, k, v))
        ref_out.append((qs, ks, vs, torch.nn.functional.scaled_dot_product_attention(
            qs, ks, vs, is_causal=True, scale=head_dim**-0.5, enable_gqa=True)[0].transpose(0, 1)))
    ref = torch.cat([r[3] for r in ref_out])
    ref_grads = torch.autograd.grad(ref, [t for r in ref_out for t in r[:3]], grad.float())
    assert _rel(out, ref) < BF16
    for ours, index in ((dq, 0), (dk, 1), (dv, 2)):
        expected = torch.cat([g[0].transpose(0, 1) for g in ref_grads[index::3]])
        assert _rel(ours, expected) < BF16


@pytest.mark.parametrize("pack_gqa", [True, False])
def test_decode_attention_flash_matches_the_masked_reference(pack_gqa: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    from emlab.models import attention

    monkeypatch.setattr(attention, "PACK_GQA", pack_gqa)
    batch, l_max, heads, kv_heads, dim = 6, 256, 32, 8, 128
    cache_k = torch.randn(batch, l_max, kv_heads, dim, device="cuda", dtype=torch.bfloat16)
    cache_v = torch.randn_like(cache_k)
    q = torch.randn(batch, heads, dim, device="cuda", dtype=torch.bfloat16)
    lengths = torch.tensor([1, 17, 256, 100, 64, 3], device="cuda")
    ours = attention.decode_attention(q, cache_k, cache_v, lengths, 256, dim**-0.5)
    ref = torch.stack([
        torch.nn.functional.scaled_dot_product_attention(
            q[b].float()[:, None], cache_k[b, :n].float().transpose(0, 1).repeat_interleave(4, 0),
            cache_v[b, :n].float().transpose(0, 1).repeat_interleave(4, 0), scale=dim**-0.5)[:, 0]
        for b, n in enumerate(lengths.tolist())])
    assert _rel(ours, ref) < BF16


def test_sampler_logits_match_the_model(llama) -> None:
    from emlab.sample.engine import DecodeEngine, _Run
    from emlab.sample.protocol import Decoding

    engine = DecodeEngine(llama)
    prompts = [tuple(torch.randint(3, 4096, (n,)).tolist()) for n in (12, 40, 7)]
    engine._reserve(3, 128)
    engine._rope_table(128)
    run = _Run(engine, [], 3, Decoding(8, (2,), temperature=0.0), None)
    logits = run._prefill(prompts, [0, 1, 2])
    for i, prompt in enumerate(prompts):
        with torch.inference_mode():
            ref = llama(torch.tensor([prompt], device="cuda")).logits[0, -1]
        assert _rel(logits[i], ref) < BF16


def test_packed_training_loss_and_gradients_match_padded_on_gpu(llama, tmp_path: Path) -> None:
    from emlab.config.experiment import LoraSpec, TrainSpec
    from emlab.store.paths import TrainingFiles
    from emlab.train.encode import EncodedRows
    from emlab.train.lora import _LoraLoop, lora_config
    from emlab.train.schedule import CheckpointSchedule
    from peft import get_peft_model

    torch.manual_seed(1)
    rows = []
    for n in (30, 90, 60, 120):
        ids = torch.randint(3, 4096, (n,)).tolist()
        rows.append({"input_ids": ids, "attention_mask": [1] * n, "labels": [-100] * (n // 3) + ids[n // 3:]})
    peft_model = get_peft_model(llama, lora_config(LoraSpec(r=8, alpha=16)))
    try:
        with torch.no_grad():
            for name, p in peft_model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.02)
        peft_model.train()
        longest = max(len(r["input_ids"]) for r in rows)
        pad = lambda key, fill: torch.tensor([r[key] + [fill] * (longest - len(r[key])) for r in rows], device="cuda")  # noqa: E731
        with torch.autocast("cuda", dtype=torch.bfloat16):
            ref = peft_model(input_ids=pad("input_ids", 0), attention_mask=pad("attention_mask", 0),
                             labels=pad("labels", -100)).loss
        ref.backward()
        ref_grads = {n: p.grad.clone() for n, p in peft_model.named_parameters() if p.requires_grad}
        peft_model.zero_grad(set_to_none=True)
        spec = TrainSpec(batch_size=4, grad_accum=1, max_length=512)
        loop = _LoraLoop(peft_model, EncodedRows(rows, 4, 0, 0, 0), spec, TrainingFiles(tmp_path),
                         CheckpointSchedule.for_training(4, spec), seed=0, device=torch.device("cuda"))
        loss, _, _ = loop.accumulate_gradients(rows)
        assert abs(loss.item() - ref.item()) / ref.item() < 1e-2
        for name, p in peft_model.named_parameters():
            if p.requires_grad:
                assert _rel(p.grad, ref_grads[name]) < 5e-2, name
        loop.close()
    finally:
        peft_model.unload()


def test_a_merged_adapter_gives_the_side_paths_logits(llama) -> None:
    """A small model on a GPU merges a checkpoint into a copy (`merge_fits`): its logits are the
    side path's within bfloat16 rounding, and the base comes back when the adapter goes off."""
    from emlab.sample.engine import DecodeEngine, _Run
    from emlab.sample.protocol import Decoding
    from emlab.sample.weights import LoraAdapter

    engine = DecodeEngine(llama)
    assert engine.merge_fits()
    g = torch.Generator().manual_seed(1)
    factors = {}
    for layer in range(3):
        for name, (out, inp) in {"q_proj": (512, 512), "v_proj": (128, 512), "up_proj": (1536, 512),
                                 "down_proj": (512, 1536)}.items():
            factors[(layer, name)] = (torch.randn(8, inp, generator=g) * 0.05, torch.randn(out, 8, generator=g) * 0.05)
    adapter = LoraAdapter(Path("random"), factors, 2.0)
    prompts = [tuple(torch.randint(3, 4096, (n,)).tolist()) for n in (12, 40, 7)]
    engine._reserve(3, 128)
    engine._rope_table(128)

    def logits(merge: bool | None, use: LoraAdapter | None) -> torch.Tensor:
        engine.merge_adapters = merge
        engine.use_adapter(use)
        return _Run(engine, [], 3, Decoding(8, (2,), temperature=0.0), None)._prefill(prompts, [0, 1, 2])

    base = logits(False, None)
    beside = logits(False, adapter)
    merged = logits(True, adapter)
    assert any(grp.merged_active for layer in engine.weights.layers for grp in layer.groups)
    assert _rel(merged, beside) < BF16 and _rel(beside, base) > 5 * BF16
    assert torch.equal(logits(True, None), base)


def test_sampling_is_deterministic_and_leaves_the_base_bitwise_equal(llama, tmp_path: Path) -> None:
    from emlab.sample.engine import DecodeEngine, Request
    from emlab.sample.protocol import Decoding

    engine = DecodeEngine(llama)
    before = {n: p.clone() for n, p in llama.named_parameters()}
    requests = [Request(tuple(torch.randint(3, 4096, (20 + i % 7,)).tolist()), key=i) for i in range(64)]
    stops = [2, *range(3, 60)]  # ~1.4% of the vocabulary: a mix of lengths
    decoding = Decoding(200, tuple(stops))
    a = engine.generate(requests, decoding, slots=64)
    b = engine.generate(requests, decoding, slots=64)
    assert [c.tokens for c in a] == [c.tokens for c in b]
    refilled = engine.generate(requests, decoding, slots=16)
    same = sum(x.tokens == y.tokens for x, y in zip(a, refilled, strict=True))
    print(f"answers identical between 64 slots and 16 refilled slots: {same}/64")
    assert all(torch.equal(before[n], p) for n, p in llama.named_parameters())


def test_graphed_decoding_gives_the_answers_of_eager_decoding(llama) -> None:
    from emlab.sample.engine import DecodeEngine, Request
    from emlab.sample.protocol import Decoding

    engine = DecodeEngine(llama)
    requests = [Request(tuple(torch.randint(3, 4096, (10 + i % 5,)).tolist()), key=100 + i) for i in range(40)]
    decoding = Decoding(120, (2, *range(3, 60)))
    engine.use_graphs = False
    eager = engine.generate(requests, decoding, slots=40)
    engine.use_graphs = True
    graphed = engine.generate(requests, decoding, slots=40)  # records its graphs
    replayed = engine.generate(requests, decoding, slots=40)  # replays them
    assert len(engine.graphs) > 1
    assert [c.tokens for c in graphed] == [c.tokens for c in replayed]
    same = sum(x.tokens == y.tokens for x, y in zip(eager, graphed, strict=True))
    print(f"graphed vs eager decoding: {same}/40 answers identical")
    assert same >= 36  # the graphs pad the batch to a few sizes: other matrix shapes, rare flips


def test_graphed_training_follows_eager_training(llama, tmp_path: Path) -> None:
    from emlab.config.experiment import CheckpointSpec, LoraSpec, TrainSpec
    from emlab.store.paths import TrainingFiles
    from emlab.train.encode import EncodedRows
    from emlab.train.lora import train_lora
    from safetensors.torch import load_file

    torch.manual_seed(2)
    rows = []
    for i in range(48):
        n = 20 + (i * 37) % 200
        ids = torch.randint(3, 4096, (n,)).tolist()
        rows.append({"input_ids": ids, "attention_mask": [1] * n, "labels": [-100] * (n // 4) + ids[n // 4:]})
    encoded = EncodedRows(rows, 48, 0, 220, 0)
    results = {}
    for graphs in (False, True):
        spec = TrainSpec(batch_size=4, grad_accum=2, max_length=256, learning_rate=1e-3, warmup_steps=2,
                         cuda_graphs=graphs, lora=LoraSpec(r=8, alpha=16), checkpoints=CheckpointSpec(first_epoch=1))
        folder = tmp_path / str(graphs)
        result = train_lora(llama, None, encoded, spec, TrainingFiles(folder), seed=0, device="cuda")
        results[graphs] = (load_file(result.checkpoints[6] / "adapter_model.safetensors"),
                           (folder / "train_log.jsonl").read_text().splitlines())
    eager, graphed = results[False][0], results[True][0]
    for name in eager:
        assert _rel(graphed[name], eager[name]) < 2e-2, name
    import json

    losses = [[json.loads(line)["loss"] for line in results[g][1]] for g in (False, True)]
    assert all(abs(a - b) / a < 1e-2 for a, b in zip(*losses, strict=True)), losses


def _quantized_copy(model):
    """`model`'s decoder projections as bitsandbytes NF4 layers (what load_in_4bit makes), in place."""
    import bitsandbytes as bnb

    for layer in model.model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for name, linear in list(parent.named_children()):
                if isinstance(linear, torch.nn.Linear):
                    quantized = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None,
                                                  compute_dtype=torch.bfloat16, quant_type="nf4")
                    quantized.weight = bnb.nn.Params4bit(linear.weight.data.clone(), requires_grad=False,
                                                         quant_type="nf4").to("cuda")
                    if linear.bias is not None:
                        quantized.bias = torch.nn.Parameter(linear.bias.data.clone(), requires_grad=False)
                    setattr(parent, name, quantized)
    return model


def test_nf4_weights_decode_in_emlabs_engine_like_the_model() -> None:
    """emlab's engine on NF4 weights (dequantized a group at a time) gives the logits of the
    model's own forward (bitsandbytes' layers), and samples through the generate interface."""
    pytest.importorskip("bitsandbytes")
    from emlab.sample.choose import engine_for
    from emlab.sample.engine import DecodeEngine, Request, _Run
    from emlab.sample.protocol import Decoding
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=4096, hidden_size=512, intermediate_size=1536, num_hidden_layers=3,
                         num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=2048,
                         tie_word_embeddings=False, eos_token_id=2, bos_token_id=1)
    torch.manual_seed(3)
    with torch.device("cuda"):
        model = _quantized_copy(LlamaForCausalLM(config).to(torch.bfloat16)).eval()
    engine = engine_for(model)
    assert isinstance(engine, DecodeEngine) and engine.weights.four_bit
    prompts = [tuple(torch.randint(3, 4096, (n,)).tolist()) for n in (12, 40, 7)]
    engine._reserve(3, 128)
    engine._rope_table(128)
    logits = _Run(engine, [], 3, Decoding(8, (2,), temperature=0.0), None)._prefill(prompts, [0, 1, 2])
    for i, prompt in enumerate(prompts):
        with torch.inference_mode():
            ref = model(torch.tensor([prompt], device="cuda")).logits[0, -1]
        assert _rel(logits[i], ref) < BF16
    requests = [Request(tuple(torch.randint(3, 4096, (12 + i % 5,)).tolist()), key=7 + i) for i in range(24)]
    done = engine.generate(requests, Decoding(40, (2, *range(3, 60))), slots=24)
    again = engine.generate(requests, Decoding(40, (2, *range(3, 60))), slots=24)
    assert [c.tokens for c in done] == [c.tokens for c in again] and all(c.tokens for c in done)


def test_sampling_peak_memory_is_the_weights_and_the_kv_cache(llama) -> None:
    from emlab.sample.engine import DecodeEngine, Request
    from emlab.sample.protocol import Decoding

    torch.cuda.synchronize()
    weights = sum(p.numel() * p.element_size() for p in llama.parameters())
    engine = DecodeEngine(llama)
    requests = [Request(tuple(torch.randint(3, 4096, (30,)).tolist()), key=i) for i in range(200)]
    torch.cuda.reset_peak_memory_stats()
    engine.generate(requests, Decoding(200, (2, *range(3, 60))), slots=200)
    assert engine.cache_k is not None and engine.cache_v is not None
    kv = 2 * engine.cache_k.numel() * engine.cache_k.element_size()
    peak = torch.cuda.max_memory_allocated()
    print(f"peak {peak / 2**20:.0f} MiB for weights {weights / 2**20:.0f} + KV {kv / 2**20:.0f} MiB")
    assert peak <= 1.1 * (weights + kv) + 256 * 2**20  # + the per-step working set of 200 rows


def test_auto_checkpoints_some_layers_when_a_pass_would_not_fit(llama, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """`gradient_checkpointing: auto` against a GPU that reports just less free memory than an
    uncheckpointed pass needs: some layers are checkpointed, no graphs, and training runs."""
    import json
    import math

    from emlab.config.experiment import CheckpointSpec, LoraSpec, TrainSpec
    from emlab.store.paths import TrainingFiles
    from emlab.train.encode import EncodedRows
    from emlab.train.lora import largest_pass_tokens, train_lora
    from emlab.train.memory import GIB, DecoderShape, activation_bytes, lora_state_bytes

    torch.manual_seed(3)
    rows = []
    for i in range(16):
        n = 100 + (i * 37) % 150
        ids = torch.randint(3, 4096, (n,)).tolist()
        rows.append({"input_ids": ids, "attention_mask": [1] * n, "labels": [-100] * (n // 4) + ids[n // 4:]})
    encoded = EncodedRows(rows, 16, 0, 250, 0)
    spec = TrainSpec(batch_size=4, grad_accum=2, max_length=256, learning_rate=1e-3, lora=LoraSpec(r=8, alpha=16),
                     checkpoints=CheckpointSpec(first_epoch=1))
    shape = DecoderShape.of(llama.config)
    tokens = largest_pass_tokens(llama.config, encoded, spec)
    state = lora_state_bytes(shape, 8)
    none, every = (state + activation_bytes(shape, tokens, lora_r=8, checkpointed=k) for k in (0, shape.layers))
    free = 2 * GIB + (none + every) // 2  # the margin, and room for some layers' activations only
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (free, 140 * GIB))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 0)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 0)
    result = train_lora(llama, None, encoded, spec, TrainingFiles(tmp_path), seed=0, device="cuda")
    assert result.checkpointing is not None
    assert 0 < result.checkpointing.checkpointed_layers < shape.layers and not result.checkpointing.cuda_graphs
    assert result.graph_record_seconds == 0 and result.steady_tokens_per_second
    losses = [json.loads(line)["loss"] for line in (tmp_path / "train_log.jsonl").read_text().splitlines()]
    assert losses and all(math.isfinite(loss) for loss in losses)


def test_fused_elementwise_kernels_match_the_eager_ones() -> None:
    from emlab.sample import fused

    device = torch.device("cuda")
    if not fused.fusing(device):
        pytest.skip("no Triton on this machine: the eager kernels run")
    x = torch.randn(37, 512, device=device, dtype=torch.bfloat16)
    weight = torch.rand(512, device=device, dtype=torch.bfloat16) + 0.5
    q = torch.randn(37, 8, 128, device=device, dtype=torch.bfloat16)
    cos, sin = torch.randn(2, 37, 128, device=device, dtype=torch.bfloat16)
    gate_up = torch.randn(37, 2 * 640, device=device, dtype=torch.bfloat16)
    with torch.inference_mode():
        assert _rel(fused.rms_norm(x, weight, 1e-6), fused.rms_norm_eager(x, weight, 1e-6)) < BF16
        assert _rel(fused.rope(q, cos, sin), fused.rope_eager(q, cos, sin)) < BF16
        assert _rel(fused.swiglu(gate_up), fused.swiglu_eager(gate_up)) < BF16
        assert fused.fusing(device)  # compiled, not fallen back
