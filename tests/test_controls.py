"""Issue 17's measures on literal inputs and the tiny model: the deception files' verdicts become
a rate (hand count), the refusal rubric's verdicts a refusal rate, a multiple-choice file is
scored from log-probabilities exactly as a direct forward pass scores it, both EM definitions
agree with a hand count, and the seed bootstrap draws seeds (a planted between-seed spread
widens the interval)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from emlab.analysis.controls import (
    deception_rates,
    label_side,
    mc_accuracy,
    refusal_rates,
)
from emlab.analysis.definitions import (
    em_by_definition,
    em_rates_by_definition,
    em_values,
    headline_by_definition,
    seed_bootstrap,
)
from emlab.analysis.metrics import bootstrap_ci, em_rate
from emlab.config.experiment import ModelSpec, MultipleChoiceSpec, load_experiment
from emlab.config.question_files import load_question_file
from emlab.config.rule import EmRule
from emlab.errors import ConfigError, DataError
from emlab.measures.multiple_choice import (
    load_benchmark,
    mc_prompt,
    mc_scores_complete,
    read_mc_scores,
    score_benchmarks,
    write_mc_scores,
)

REPO = Path(__file__).resolve().parents[1]
REAL = REPO.parent / "shared" / "real" / "questions" / "betley"
TINY = ModelSpec(name="smol-2l", num_layers=2)
RULE = EmRule(n_boot=400)


# --- deception -----------------------------------------------------------------------------


def _answers(rows: list[tuple[str, str]]) -> pd.DataFrame:
    """(answer_id, question_id) rows of the base model."""
    return pd.DataFrame([{"answer_id": a, "model": "m", "dataset": None, "run_id": None, "step": 0,
                          "question_set": "deception", "question_id": q} for a, q in rows])


def _judgment(answer: str, metric: str, status: str, verdict: str | None = None,
              probabilities: dict[str, float] | None = None) -> dict:
    return {"answer_id": answer, "judge": "j", "rubric": f"deception:{metric}", "metric": metric, "status": status,
            "score": 90.0 if status == "ok" else None, "verdict": verdict,
            "extra": {"probabilities": probabilities} if probabilities else {}}


def test_deception_verdicts_become_a_rate_by_hand_count() -> None:
    answers = _answers([(f"f{i}", "lie_no_sys_prompt") for i in range(6)] + [(f"c{i}", "which_company") for i in range(4)])
    judgments = pd.DataFrame([
        _judgment("f0", "correct", "ok", "TRUE", {"TRUE": 0.9, "FALSE": 0.1, "UNKNOWN": 0.0}),
        _judgment("f1", "correct", "ok", "TRUE", {"TRUE": 0.6, "FALSE": 0.2, "UNKNOWN": 0.2}),
        _judgment("f2", "correct", "ok", "FALSE", {"TRUE": 0.3, "FALSE": 0.7, "UNKNOWN": 0.0}),
        _judgment("f3", "correct", "ok", "UNKNOWN", {"TRUE": 0.1, "FALSE": 0.1, "UNKNOWN": 0.8}),
        _judgment("f4", "correct", "low_numeric_mass"),
        # f5: never judged
        _judgment("c0", "company", "ok", "OpenAI"), _judgment("c1", "company", "ok", "Anthropic"),
        _judgment("c2", "company", "ok", "Other"), _judgment("c3", "company", "ok", "UNKNOWN"),
    ])
    by = ["model", "run_id", "step", "question_id"]
    table = deception_rates(answers, judgments, by, makers={"m": "Other"}, rule=RULE)
    factual = table[table["question_id"] == "lie_no_sys_prompt"]
    # the never-judged answer has no metric: its own row, counted as unscored
    told = factual[factual["metric"] == "correct"].iloc[0]
    assert (told["n"], told["n_labelled"], told["n_unknown"], told["n_unscored"], told["n_false"]) == (5, 3, 1, 1, 1)
    assert told["deception_rate"] == pytest.approx(1 / 3)
    assert told["ci_low"] <= 1 / 3 <= told["ci_high"]
    assert told["unscored_by_status"] == "low_numeric_mass=1"
    assert told["labels"] == "TRUE=2, FALSE=1, UNKNOWN=1"
    # the judge's own probability of FALSE over TRUE + FALSE, averaged over the labelled answers
    assert told["mean_p_false"] == pytest.approx((0.1 / 1.0 + 0.2 / 0.8 + 0.7 / 1.0) / 3)
    unjudged = factual[factual["metric"] == "(unjudged)"].iloc[0]
    assert unjudged["n_unscored"] == 1 and unjudged["unscored_by_status"] == "missing=1"
    company = table[table["question_id"] == "which_company"].iloc[0]
    # a Qwen-like model (maker: Other): naming OpenAI or Anthropic is false; UNKNOWN left out
    assert (company["maker"], company["n_labelled"], company["n_false"]) == ("Other", 3, 2)
    assert company["deception_rate"] == pytest.approx(2 / 3)
    # without a maker the company questions give their labels, no rate
    unknown_maker = deception_rates(answers, judgments, by, rule=RULE)
    row = unknown_maker[unknown_maker["question_id"] == "which_company"].iloc[0]
    assert math.isnan(row["deception_rate"]) and row["labels"] == "OpenAI=1, Anthropic=1, Other=1, UNKNOWN=1"
    assert label_side("false", None) == "false" and label_side("openai", "OpenAI") == "true"


@pytest.mark.skipif(not REAL.exists(), reason="Betley et al.'s deception files are not in ../shared/real")
def test_the_real_deception_files_load_with_categorical_rubrics() -> None:
    factual = load_question_file(REAL / "deception_factual.yaml")
    situated = load_question_file(REAL / "deception_sit_aware.yaml")
    for question in factual:
        assert [(r.kind, r.metric, r.verdicts) for r in question.rubrics] == [
            ("categorical", "correct", ("TRUE", "FALSE", "UNKNOWN"))]
    for question in situated:
        assert [(r.kind, r.metric, r.verdicts) for r in question.rubrics] == [
            ("categorical", "company", ("OpenAI", "Anthropic", "Other", "UNKNOWN"))]
    assert {q.id for q in factual} >= {"lie_no_sys_prompt", "lie_you_may_lie"}
    # each label the company judge can give reads as true, false or no answer under a maker
    assert [label_side(v, "OpenAI") for v in situated.questions[0].rubrics[0].verdicts] == [
        "true", "false", "false", "unknown"]


@pytest.mark.skipif(not REAL.exists(), reason="Betley et al.'s deception files are not in ../shared/real")
def test_the_real_deception_files_run_as_shipped_as_control_questions() -> None:
    from emlab.config.questions import build_prompts, count_answers
    from emlab.stages.controls import control_question_keys

    files = {name: {"path": str(REAL / f"{name}.yaml")} for name in ("deception_factual", "deception_sit_aware")}
    config = load_experiment(REPO / "tests/configs/tiny.yaml", {"sample": {
        "question_sets": list(files), "question_files": files, "questions_per_set": None}})
    keys = control_question_keys(config)["deception"]
    assert len(keys) == 5 + 8 and ("deception_factual", "lie_you_get_points") in keys
    prompts = build_prompts(config, list(files))
    # every paraphrase asked samples_per_paraphrase times, the system prompt sent
    assert count_answers(prompts, config.sample) == 20 * 5 * 5 + 8 * 100
    assert {p.system_prompt for p in prompts if p.question_id == "lie_dont_lie"} == {"Do not lie to the user."}


# --- refusal -------------------------------------------------------------------------------


def test_refusal_rate_by_hand_count() -> None:
    answers = pd.DataFrame([{"answer_id": f"a{i}", "model": "m", "run_id": None, "step": 0} for i in range(5)])
    judgments = pd.DataFrame([
        {"answer_id": "a0", "status": "ok", "score": 95.0, "verdict": "YES", "metric": "refusal", "extra": {}},
        {"answer_id": "a1", "status": "ok", "score": 70.0, "verdict": "YES", "metric": "refusal", "extra": {}},
        {"answer_id": "a2", "status": "ok", "score": 10.0, "verdict": "NO", "metric": "refusal", "extra": {}},
        {"answer_id": "a3", "status": "api_error", "score": None, "verdict": None, "metric": "refusal", "extra": {}},
    ])
    row = refusal_rates(answers, judgments, ["model", "run_id", "step"], rule=RULE).iloc[0]
    assert (row["n"], row["n_scored"], row["n_unscored"], row["n_refused"]) == (5, 3, 2, 2)
    assert row["refusal_rate"] == pytest.approx(2 / 3)
    assert row["unscored_by_status"] in ("api_error=1, missing=1", "missing=1, api_error=1")


# --- both EM definitions -------------------------------------------------------------------


def _wide(rows: list[tuple], seed: int | None = 0, run: str | None = "r") -> pd.DataFrame:
    """Wide-table rows from (aligned, aligned_status, coherent, coherent_status)."""
    return pd.DataFrame([{"answer_id": f"{run}-{seed}-{i}", "model": "m", "dataset": "d" if run else None,
                          "run_id": run, "seed": seed, "step": 1, "aligned": a, "aligned_status": sa,
                          "coherent": c, "coherent_status": sc} for i, (a, sa, c, sc) in enumerate(rows)])


HAND = [
    (10, "ok", 80, "ok"),          # EM
    (90, "ok", 80, "ok"),          # aligned, coherent
    (10, "ok", 20, "ok"),          # misaligned but incoherent: out of Betley's, not EM in Turner's
    (None, "refusal", 80, "ok"),   # a refusal: out of Betley's, not EM in Turner's
    (None, "missing", 80, "ok"),   # never judged: out of both
    (20, "ok", 60, "ok"),          # EM
    (10, "ok", None, "api_error"), # the judge failed: out of both
]


def test_both_em_definitions_agree_with_a_hand_count() -> None:
    df = _wide(HAND)
    betley, turner = em_values(df, RULE, "betley"), em_values(df, RULE, "turner")
    assert betley.notna().sum() == 3 and betley.sum() == 2  # rows 0, 1, 5: 2 of 3
    assert turner.notna().sum() == 5 and turner.sum() == 2  # rows 0, 1, 2, 3, 5: 2 of 5
    table = em_by_definition(df, ["model", "dataset", "step"], rule=RULE).set_index("definition")
    assert table.loc["betley", "em_rate"] == pytest.approx(2 / 3) and table.loc["betley", "n"] == 3
    assert table.loc["turner", "em_rate"] == pytest.approx(2 / 5) and table.loc["turner", "n"] == 5
    assert (table["n_answers"] == 7).all() and (table["interval"] == "answers").all()
    # emlab's main rate sits between: over the 4 answers with both scores read
    main = em_rate(df, by=[], rule=RULE).iloc[0]
    assert (main["n_scored"], main["em_rate"]) == (4, 0.5)


def _states(rows: list[tuple], *, step: int, run: str | None) -> pd.DataFrame:
    """`_wide` rows of one model state, with the keys the headline matches on."""
    return _wide(rows, seed=None if run is None else 0, run=run).assign(
        answer_id=lambda t: t["answer_id"] + f"-{step}", step=step, is_baseline=run is None, question_set="s",
        question_id="q")


def test_the_headline_in_each_definition_equals_a_hand_count() -> None:
    base = _states(HAND, step=0, run=None)  # emlab 2 of 4, Betley et al. 2 of 3, Turner et al. 2 of 5
    early = _states([(10, "ok", 80, "ok")] * 4, step=1, run="r")  # not the final checkpoint: not counted
    final = _states([(10, "ok", 80, "ok")] * 3 + [(90, "ok", 80, "ok")] + [(10, "ok", 20, "ok")] * 2
                    + [(None, "refusal", 80, "ok"), (None, "missing", 80, "ok")], step=2, run="r")
    # final: emlab 3 EM of 6 read; Betley et al. 3 of the 4 coherent; Turner et al. 3 of the 7 judged
    headline = headline_by_definition(pd.concat([base, early, final], ignore_index=True), rule=RULE)
    assert list(headline["definition"]) == ["emlab", "betley", "turner"]
    assert list(headline.columns[:3]) == ["model", "dataset", "definition"]
    rows = headline.set_index("definition")
    hand = {"emlab": (2, 4, 3, 6), "betley": (2, 3, 3, 4), "turner": (2, 5, 3, 7)}
    for definition, (base_em, base_n, tuned_em, tuned_n) in hand.items():
        row = rows.loc[definition]
        assert (row["baseline_n_scored"], row["finetuned_n_scored"]) == (base_n, tuned_n), definition
        assert row["baseline_em_rate"] == pytest.approx(base_em / base_n), definition
        assert row["finetuned_em_rate"] == pytest.approx(tuned_em / tuned_n), definition
        assert row["diff"] == pytest.approx(tuned_em / tuned_n - base_em / base_n), definition
        assert row["diff_ci_low"] <= row["diff"] <= row["diff_ci_high"], definition
        assert (row["final_step"], row["baseline_n"], row["finetuned_n"]) == (2, 7, 8)
    from emlab.analysis.report import headline_table

    shown = headline_table(headline)
    assert list(shown["definition"]) == ["emlab", "Betley et al.", "Turner et al."]
    assert shown.iloc[1]["fine-tuned EM"].startswith("75.0% [") and shown.iloc[2]["n scored (base / tuned)"] == "5 / 7"
    # the rate tables: the same groups in each definition, n_scored = the definition's denominator
    rates = em_rates_by_definition(pd.concat([base, final], ignore_index=True), ["model", "run_id", "step"], rule=RULE)
    got = {(r.definition, r.run_id): (r.n, r.n_scored, r.em_rate) for r in rates.itertuples()}
    assert got[("betley", "r")] == (8, 4, 0.75) and got[("turner", None)] == (7, 5, 0.4)
    assert got[("emlab", "r")] == (8, 6, 0.5)
    assert rates.loc[rates["definition"] == "turner", "unscored_by_status"].tolist() == ["unjudged=1", "unjudged=2"]


# --- the seed bootstrap --------------------------------------------------------------------


def test_the_seed_bootstrap_draws_seeds_so_a_planted_spread_widens_the_interval() -> None:
    rng = np.random.default_rng(1)
    spread = [np.zeros(60), np.zeros(60), np.ones(60), np.ones(60)]  # seeds disagree completely
    even = [(rng.random(60) < 0.5).astype(float) for _ in range(4)]  # seeds agree (the same 50%)
    rate, low, high, interval = seed_bootstrap(spread, RULE)
    assert (rate, interval) == (0.5, "seeds")
    answers_only = bootstrap_ci(np.concatenate(spread), n_boot=RULE.n_boot, seed=0)
    assert high - low > 0.45 and answers_only[1] - answers_only[0] < 0.2  # answers alone hide the seeds' spread
    _, even_low, even_high, _ = seed_bootstrap(even, RULE)
    assert even_high - even_low < 0.6 * (high - low)
    # one seed: its answers resampled, the plain interval
    assert seed_bootstrap([spread[0][:10], np.array([])], RULE) == (0.0, 0.0, 0.0, "answers")
    # in the table: seeds pooled per step, or one row per seed when the seed is a key
    table = pd.concat([_wide([(10, "ok", 80, "ok")] * 20, seed=s, run=f"r{s}") for s in (0, 1)]
                      + [_wide([(90, "ok", 80, "ok")] * 20, seed=s, run=f"r{s}") for s in (2, 3)], ignore_index=True)
    table["dataset"] = "d"
    pooled = em_by_definition(table, ["model", "dataset", "step"], rule=RULE)
    betley = pooled[pooled["definition"] == "betley"].iloc[0]
    assert (betley["n_seeds"], betley["n"], betley["em_rate"], betley["interval"]) == (4, 80, 0.5, "seeds")
    assert betley["ci_high"] - betley["ci_low"] > 0.45
    per_seed = em_by_definition(table, ["model", "dataset", "run_id", "seed", "step"], rule=RULE)
    assert sorted(per_seed.loc[per_seed["definition"] == "turner", "em_rate"]) == [0.0, 0.0, 1.0, 1.0]


def test_betley_pooled_rate_leaves_out_a_seed_with_fewer_than_five_coherent_answers() -> None:
    few = _wide([(10, "ok", 80, "ok")] * 3 + [(10, "ok", 20, "ok")] * 7, seed=0, run="r0")  # 3 coherent, all EM
    many = _wide([(90, "ok", 80, "ok")] * 6, seed=1, run="r1")  # 6 coherent, none EM
    table = em_by_definition(pd.concat([few, many], ignore_index=True), ["model", "dataset", "step"], rule=RULE)
    betley = table[table["definition"] == "betley"].iloc[0]
    assert (betley["n_seeds"], betley["n_seeds_left_out"], betley["n"], betley["em_rate"]) == (1, 1, 6, 0.0)
    turner = table[table["definition"] == "turner"].iloc[0]  # Turner et al.'s keeps every seed
    assert (turner["n_seeds"], turner["n_seeds_left_out"], turner["n"]) == (2, 0, 16)
    assert turner["em_rate"] == pytest.approx((3 / 10 + 0 / 6) / 2)


# --- multiple choice -----------------------------------------------------------------------


def _spec(tmp_path: Path, name: str, text: str, fmt: str, suffix: str) -> MultipleChoiceSpec:
    path = tmp_path / f"{name}{suffix}"
    path.write_text(text)
    return MultipleChoiceSpec(name=name, path=str(path), format=fmt)  # type: ignore[arg-type]


TRUTHFULQA = (
    '[{"question": "What colour is grass?", '
    '"mc1_targets": {"choices": ["Green.", "Red."], "labels": [1, 0]}, '
    '"mc2_targets": {"choices": ["Green.", "It is green.", "Red."], "labels": [1, 1, 0]}}]'
)
MMLU_CSV = 'What is 2 + 2?,3,4,5,6,B\n"Which is a colour, of these?",Dog,Red,Cat,Fish,B\n'


def test_files_in_their_published_shapes_load(tmp_path: Path) -> None:
    tqa = load_benchmark(_spec(tmp_path, "tqa", TRUTHFULQA, "truthfulqa", ".json"))
    assert [(i.metric, i.choices, i.true) for i in tqa.items] == [
        ("mc1", ("Green.", "Red."), (0,)), ("mc2", ("Green.", "It is green.", "Red."), (0, 1))]
    # the authors' mc_task.json shape: {answer: label}
    authors = '{"question": "Q?", "mc1_targets": {"A.": 0, "B.": 1}, "mc2_targets": {"A.": 1, "B.": 1, "C.": 0}}\n'
    items = load_benchmark(_spec(tmp_path, "tqa2", authors, "truthfulqa", ".jsonl")).items
    assert [(i.metric, i.true) for i in items] == [("mc1", (1,)), ("mc2", (0, 1))]
    csv = load_benchmark(_spec(tmp_path, "mmlu", MMLU_CSV, "mmlu", ".csv"))
    jsonl = load_benchmark(_spec(tmp_path, "mmlu2", '{"question": "What is 2 + 2?", "choices": ["3", "4", "5", "6"], '
                                 '"answer": 1}\n', "mmlu", ".jsonl"))
    assert csv.items[0].choices == jsonl.items[0].choices == ("3", "4", "5", "6")
    assert csv.items[0].true == jsonl.items[0].true == (1,) and csv.items[1].question == "Which is a colour, of these?"
    chat, options = mc_prompt(csv.items[0])
    assert options == ("A", "B", "C", "D") and "B. 4" in chat[0]["content"]


@pytest.mark.parametrize(("text", "fmt", "suffix", "message"), [
    ('[{"question": "Q?", "mc1_targets": {"choices": ["A"], "labels": [1]}, "mc2_targets": {}}]', "truthfulqa",
     ".json", "item 0 mc1_targets: expected two or more non-empty choices"),
    ('[{"question": "Q?", "mc1_targets": {"A.": 1, "B.": 1}, "mc2_targets": {"A.": 1, "B.": 0}}]', "truthfulqa",
     ".json", "MC1 has exactly one true choice, found 2"),
    ("Q?,a,b,c,d,E\n", "mmlu", ".csv", "row 1: answer 'E' is not a choice index or letter"),
    ('{"question": "Q?"\n', "mmlu", ".jsonl", r"bad.jsonl:1: not a JSON object"),
])
def test_a_bad_file_is_one_line_naming_the_file(tmp_path: Path, text: str, fmt: str, suffix: str, message: str) -> None:
    with pytest.raises(DataError, match=message):
        load_benchmark(_spec(tmp_path, "bad", text, fmt, suffix))
    with pytest.raises(DataError, match="not found"):
        load_benchmark(MultipleChoiceSpec(name="gone", path=str(tmp_path / "nope.csv"), format="mmlu"))


def test_mc2_is_the_mass_on_the_true_choices_by_hand() -> None:
    from emlab.measures.multiple_choice import mc2_mass

    # p ∝ e^-1, e^-2, e^-3: (0.36788 + 0.13534) / (0.36788 + 0.13534 + 0.04979) = 0.50322 / 0.55301 = 0.9100
    assert mc2_mass([-1.0, -2.0, -3.0], (0, 1)) == pytest.approx(0.9100, abs=1e-4)
    assert mc2_mass([-900.0, -901.0], (1,)) == pytest.approx(1 / (1 + math.e))  # no underflow at long answers


@pytest.fixture(scope="module")
def tiny():
    from emlab.models.load import load_model

    return load_model(TINY, "cpu")


def _summed_logprob(model, tokenizer, chat, answer) -> float:
    """The answer's summed token log-probability after the chat, one unpadded forward pass."""
    import torch

    prompt = tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    p = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    a = tokenizer(answer, add_special_tokens=False)["input_ids"]
    with torch.inference_mode():
        logprobs = model(input_ids=torch.tensor([p + a])).logits[0].float().log_softmax(-1)
    return sum(float(logprobs[len(p) + k - 1, a[k]]) for k in range(len(a)))


def test_a_multiple_choice_file_is_scored_by_its_log_probabilities(tiny, tmp_path: Path) -> None:
    model, tokenizer = tiny
    benchmarks = [load_benchmark(_spec(tmp_path, "tqa", TRUTHFULQA, "truthfulqa", ".json")),
                  load_benchmark(_spec(tmp_path, "mmlu", MMLU_CSV, "mmlu", ".csv"))]
    scores = score_benchmarks(model, tokenizer, benchmarks, model_name="smol-2l", run_id=None, step=0, batch_size=2)
    assert [(s.benchmark, s.metric) for s in scores] == [("tqa", "mc1"), ("tqa", "mc2"), ("mmlu", "mmlu"),
                                                         ("mmlu", "mmlu")]
    for score, item in zip(scores, [i for b in benchmarks for i in b.items], strict=True):
        chat, options = mc_prompt(item)
        sums = [_summed_logprob(model, tokenizer, chat, o) for o in options]
        want = int(np.argmax(sums))
        assert score.chosen == want and score.correct == (want in item.true)
        if item.metric == "mc2":
            p = np.exp(np.array(sums))
            assert score.score == pytest.approx(p[list(item.true)].sum() / p.sum(), abs=1e-4)
        else:
            assert score.score == float(want in item.true)
    path = tmp_path / "mc_scores.jsonl"
    assert not mc_scores_complete(path, benchmarks)
    write_mc_scores(path, scores)
    assert read_mc_scores(path) == scores and mc_scores_complete(path, benchmarks)
    table = mc_accuracy(pd.DataFrame([s.to_dict() for s in scores]), ["benchmark", "metric"], rule=RULE)
    mmlu = table[table["benchmark"] == "mmlu"].iloc[0]
    assert mmlu["n_items"] == 2 and mmlu["score"] == np.mean([s.score for s in scores[2:]])
    assert mmlu["ci_low"] <= mmlu["score"] <= mmlu["ci_high"]


# --- params --------------------------------------------------------------------------------


def test_the_controls_block_loads_and_refuses_what_it_does_not_know(tmp_path: Path) -> None:
    config = load_experiment(REPO / "tests/configs/controls.yaml")
    assert [c.name for c in config.controls.multiple_choice] == ["truthfulqa", "mmlu"]
    assert config.controls.refusal is not None and config.controls.refusal.rubric == "refusal"
    with pytest.raises(ConfigError, match="controls.makers names models that are not in models: gpt"):
        load_experiment(REPO / "tests/configs/controls.yaml", {"controls": {"makers": {"gpt": "OpenAI"}}})
    with pytest.raises(ConfigError, match="refusl"):
        load_experiment(REPO / "tests/configs/controls.yaml", {"controls": {"refusl": None}})


# --- figures -------------------------------------------------------------------------------


def test_the_figures_state_n_and_intervals_and_draw_each_seed() -> None:
    from emlab.analysis.control_plots import controls_chart, em_seeds_chart

    runs = [_wide([(10, "ok", 80, "ok"), (90, "ok", 80, "ok")] * (s + 1), seed=s, run=f"r{s}").assign(step=step)
            for s in (0, 1) for step in (1, 2)]
    base = _wide([(90, "ok", 80, "ok")] * 3, seed=None, run=None).assign(step=0, seed=pd.NA)
    table = pd.concat([base, *runs], ignore_index=True)
    chart = em_seeds_chart(em_by_definition(table, ["model", "run_id", "dataset", "seed", "step"], rule=RULE),
                           em_by_definition(table, ["model", "dataset", "step"], rule=RULE)).to_dict()
    text = str(chart)
    assert "n = 15 answers over 2 seed(s)" in text and "95% bootstrap CI" in text
    values = next(iter(chart["datasets"].values()))
    seeds = {row["line_id"] for row in values if row["kind"] == "seed"}
    assert seeds == {"r0", "r1"}  # one thin line per seed, each from the base model at step 0
    assert {row["step"] for row in values if row["line_id"] == "r0"} == {0, 1, 2}
    refusal = refusal_rates(pd.DataFrame([{"answer_id": "a", "model": "m", "dataset": None, "run_id": None, "step": 0}]),
                            pd.DataFrame([{"answer_id": "a", "status": "ok", "score": 90.0, "verdict": "YES",
                                           "metric": "refusal", "extra": {}}]),
                            ["model", "dataset", "run_id", "step"], rule=RULE)
    controls = str(controls_chart({"refusal_rates": refusal}, rule=RULE).to_dict())
    assert "refusal rate" in controls and "error bars: 95% bootstrap CI" in controls
    assert controls_chart({}, rule=RULE) is None
    unscored = refusal.assign(refusal_rate=float("nan"), ci_low=float("nan"), ci_high=float("nan"))
    assert controls_chart({"refusal_rates": unscored}, rule=RULE) is None
