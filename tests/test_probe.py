"""The judge-free logprob probe: the probe sets in params are well formed and balanced, a bad
file is refused in one line naming file and line, and the scores read on the tiny model (real
SmolLM2 tokenizer, 2 layers, CPU) are the answer tokens' mean log-probabilities, the same
batched or one at a time, and move when an adapter is applied."""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd
import pytest
from emlab.analysis.metrics import probe_gaps
from emlab.config.experiment import ModelSpec
from emlab.config.rule import EmRule
from emlab.errors import DataError
from emlab.measures.probe import (
    ProbeScore,
    answer_logprobs,
    list_probe_sets,
    load_probe_set,
    probe_messages,
    probe_scores_complete,
    read_probe_scores,
    score_probes,
    write_probe_scores,
)

REPO = Path(__file__).resolve().parents[1]
TINY = ModelSpec(name="smol-2l", num_layers=2)


# --- the probe sets in params --------------------------------------------------------------


def test_probe_sets_in_params_load_and_are_balanced() -> None:
    assert {"general", "medical", "financial"} <= set(list_probe_sets())
    for name in list_probe_sets():
        probe_set = load_probe_set(name)
        assert len(probe_set) >= 6, name
        for probe in probe_set.probes:
            # alike in length, so the gap says what the answers say rather than how long they are
            ratio = len(probe.misaligned) / len(probe.aligned)
            assert 0.75 < ratio < 1.33, (name, probe.id, ratio)


def write(tmp_path: Path, text: str, name: str = "mine") -> str:
    path = tmp_path / f"{name}.yaml"
    path.write_text(text)
    return str(path)


GOOD = """name: mine
probes:
  - id: p1
    question: Q?
    aligned: A good answer.
    misaligned: A bad answer.
"""


@pytest.mark.parametrize(("text", "message"), [
    (GOOD.replace("    misaligned:", "    misalgned:"),
     r"mine.yaml:6: unknown key 'probes\[0\].misalgned' \(did you mean 'misaligned'\?\)"),
    (GOOD.replace("    misaligned: A bad answer.\n", ""), r"mine.yaml:3: probes\[0\] is missing required key 'misaligned'"),
    (GOOD.replace("name: mine", "name: other"), r"mine.yaml:1: 'name': must be the file name 'mine', found 'other'"),
    (GOOD + GOOD.split("probes:\n")[1], r"mine.yaml:7: 'probes\[1\]\.id': duplicate probe id 'p1' \(first on line 3\)"),
    (GOOD.replace("A bad answer.", "A good answer."), r"mine.yaml:6: 'probes\[0\]\.misaligned': the aligned and misaligned answers are the same"),
    ("- id: p1\n", r"mine.yaml:1: expected a mapping with name, probes, found a list"),
])
def test_bad_probe_file_is_one_line_with_file_and_line(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(DataError, match=message):
        load_probe_set(write(tmp_path, text))


def test_unknown_probe_set_suggests_the_nearest() -> None:
    with pytest.raises(DataError, match=r"unknown probe set 'genral'.*did you mean 'general'"):
        load_probe_set("genral")


def test_probe_messages_system_turn() -> None:
    probe = load_probe_set("general").probes[0]
    assert probe_messages(probe) == [{"role": "user", "content": probe.question}]
    assert probe_messages(probe, "Be brief.")[0] == {"role": "system", "content": "Be brief."}


# --- scores on the tiny model --------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny():
    from emlab.models.load import load_model

    return load_model(TINY, "cpu")


def _reference(model, tokenizer, chat, answer) -> tuple[float, int]:
    """The answer's mean token log-probability from one unpadded forward pass, by hand."""
    import torch

    prompt = tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    p = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    a = tokenizer(answer, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([p + a])
    with torch.inference_mode():
        logprobs = model(input_ids=ids).logits[0].float().log_softmax(-1)
    total = sum(float(logprobs[len(p) + k - 1, a[k]]) for k in range(len(a)))
    return total / len(a), len(a)


def test_answer_logprobs_are_the_answer_tokens_mean_batched_or_not(tiny) -> None:
    model, tokenizer = tiny
    chats = [[{"role": "user", "content": "Hi?"}], [{"role": "user", "content": "A much longer question " * 6}],
             [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Why?"}],
             [{"role": "user", "content": "Hi?"}]]  # shares the first prompt's pass
    answers = ["Hello there.", "Short.", "Because the sky is blue and the grass is green, mostly.",
               "Go away, I do not talk to people like you."]
    batched = answer_logprobs(model, tokenizer, chats, answers, batch_size=3)
    single = answer_logprobs(model, tokenizer, chats, answers, batch_size=1)
    for (got, n), (alone, n1), chat, answer in zip(batched, single, chats, answers, strict=True):
        want, n_want = _reference(model, tokenizer, chat, answer)
        assert n == n1 == n_want == len(tokenizer(answer, add_special_tokens=False)["input_ids"])
        assert got == pytest.approx(want, abs=1e-4) and alone == pytest.approx(want, abs=1e-4)
        assert got < 0


def test_score_probes_gap_and_files(tiny, tmp_path: Path) -> None:
    model, tokenizer = tiny
    sets = [load_probe_set("general")]
    scores = score_probes(model, tokenizer, sets, model_name="smol-2l", run_id=None, step=0)
    assert len(scores) == len(sets[0])
    for score in scores:
        assert score.gap == pytest.approx(score.misaligned_logprob - score.aligned_logprob)
        assert score.aligned_tokens > 5 and score.misaligned_tokens > 5
        assert math.isfinite(score.gap)
    path = tmp_path / "probe_scores.jsonl"
    assert not probe_scores_complete(path, sets)
    write_probe_scores(path, scores)
    assert read_probe_scores(path) == scores
    assert probe_scores_complete(path, sets)
    # another version of the probe text is scored again
    changed = [sets[0].__class__(name="general", description="", path=sets[0].path,
                                 probes=(sets[0].probes[0].__class__(**{**sets[0].probes[0].__dict__,
                                                                      "aligned": "Something else."}),))]
    assert not probe_scores_complete(path, changed)


def test_an_adapter_moves_the_probe_and_leaves_the_base_model_as_it_was(tiny, tmp_path: Path) -> None:
    import torch
    from emlab.sample.generate import adapter_applied
    from peft import LoraConfig, get_peft_model

    model, tokenizer = tiny
    sets = [load_probe_set("medical")]
    before = score_probes(model, tokenizer, sets, model_name="m", run_id=None, step=0)
    # a LoRA adapter with non-zero B, saved the way training saves checkpoints
    peft = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, param in peft.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5, generator=torch.Generator().manual_seed(0))
    peft.save_pretrained(tmp_path / "adapter")
    peft.unload()
    with adapter_applied(model, tmp_path / "adapter") as tuned:
        during = score_probes(tuned, tokenizer, sets, model_name="m", run_id="r", step=1)
    after = score_probes(model, tokenizer, sets, model_name="m", run_id=None, step=0)
    assert [s.gap for s in during] != pytest.approx([s.gap for s in before], abs=1e-3)
    assert [s.gap for s in after] == pytest.approx([s.gap for s in before], abs=1e-5)


# --- the summary over probes ---------------------------------------------------------------


def test_probe_gaps_on_literal_scores() -> None:
    rows = [ProbeScore("general", f"p{i}", "m", run, step, -2.0, -2.0 + gap, 10, 10, "d").to_dict()
            for run, step, gaps in ((None, 0, (-1.0, -0.5, 0.5)), ("r", 5, (0.25, 0.25, 0.25)))
            for i, gap in enumerate(gaps)]
    table = probe_gaps(pd.DataFrame(rows), ["run_id", "step"], rule=EmRule(n_boot=200))
    base, tuned = table[table["run_id"].isna()].iloc[0], table[table["run_id"] == "r"].iloc[0]
    assert len(table) == 2 and base["n_probes"] == 3 and base["step"] == 0
    assert base["mean_gap"] == pytest.approx(-1 / 3)
    assert base["share_misaligned_preferred"] == pytest.approx(1 / 3)
    assert base["ci_low"] <= base["mean_gap"] <= base["ci_high"]
    assert (tuned["mean_gap"], tuned["ci_low"], tuned["ci_high"]) == (0.25, 0.25, 0.25)  # all equal: no spread
    assert tuned["share_misaligned_preferred"] == 1.0
    assert table.attrs["rule"]["n_boot"] == 200
