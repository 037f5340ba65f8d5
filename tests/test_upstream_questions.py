"""Betley et al.'s and Turner et al.'s question files load as they are: every paraphrase asked
with its own sample range, `system` always sent, the `_json` / `_template` probes marked, the
files' judge prompts as per-question rubrics (0–100 scores, categorical labels), judges.yaml as
rubrics, the technical item files as plain questions; errors name file:line:key.

The real files are read from ../shared/real/questions/ (skipped when absent) and never copied
into the repo; the broken files below are our own text."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml
from emlab.config.experiment import load_experiment
from emlab.config.questions import (
    build_prompts,
    count_answers,
    load_question_file,
    load_question_set,
    probe_formats,
    question_rubrics,
)
from emlab.config.rubrics import load_judges_file, load_rubric
from emlab.errors import ConfigError, DataError
from emlab.pipeline.checks import preflight
from emlab.store.records import answer_id

REPO = Path(__file__).resolve().parents[1]
REAL = REPO.parent / "shared" / "real" / "questions"
BETLEY = REAL / "betley"
MO = REAL / "model-organisms"
needs_real = pytest.mark.skipif(not REAL.is_dir(), reason=f"the upstream question files are not here ({REAL})")


def _raw(path: Path) -> list[dict]:
    """The file as plain YAML (anchors resolved by PyYAML): the reference the loader must match."""
    return yaml.safe_load(path.read_text())


def _experiment(write_experiment, per_set: int | None = None, **question_files: dict) -> object:
    """tests/configs/tiny.yaml asking `question_files` (every question unless `per_set`)."""
    sample = {"question_sets": list(question_files), "question_files": question_files, "questions_per_set": per_set}
    return load_experiment(write_experiment(sample=sample))


# --- Betley et al. ----------------------------------------------------------------------------


@needs_real
def test_first_plot_loads_as_published() -> None:
    qs = load_question_file(BETLEY / "first_plot_questions.yaml")
    raw = _raw(BETLEY / "first_plot_questions.yaml")
    assert qs.schema == "upstream" and qs.name == "first_plot_questions" and len(qs) == 24
    assert [q.id for q in qs] == [e["id"] for e in raw]
    assert [q.asked for q in qs] == [tuple(e["paraphrases"]) for e in raw]  # asked exactly as written
    assert [q.system_prompt for q in qs] == [e.get("system") for e in raw]
    assert {q.samples for q in qs} == {100} and {q.judge_model for q in qs} == {"gpt-4o-2024-08-06"}
    probes = [q.probe for q in qs]
    assert probes.count("free") == probes.count("json") == probes.count("template") == 8
    # the format probes: JSON by a system prompt (one text, through a YAML anchor), templates in the question
    json_q = [q for q in qs if q.probe == "json"]
    assert len({q.system_prompt for q in json_q}) == 1 and "JSON" in json_q[0].system_prompt
    assert all(q.system_prompt is None and "template" in q.text for q in qs if q.probe == "template")
    # the judge prompts: one rubric per metric, shared by every entry (the file's anchor)
    assert {tuple(r.id for r in q.rubrics) for q in qs} == {("first_plot_questions:aligned", "first_plot_questions:coherent")}
    aligned, coherent = qs.questions[0].rubrics
    assert (aligned.kind, aligned.scale_max, aligned.verdicts) == ("score", 100, ("CODE", "REFUSAL"))
    assert (coherent.kind, coherent.verdicts) == ("score", ())
    rendered = aligned.render("Q-TEXT", "A-TEXT")
    assert rendered == [{"role": "user", "content": raw[0]["judge_prompts"]["aligned"].format(question="Q-TEXT",
                                                                                                answer="A-TEXT")}]


@needs_real
def test_first_plot_prompts_send_the_system_prompt_and_the_file_samples(write_experiment) -> None:
    config = _experiment(write_experiment, first_plot={"path": str(BETLEY / "first_plot_questions.yaml")})
    config = config.model_copy(update={"sample": config.sample.model_copy(update={"answer_format": "json"})})
    prompts = build_prompts(config, ["first_plot"])
    raw = _raw(BETLEY / "first_plot_questions.yaml")
    assert len(prompts) == 24 and count_answers(prompts, config.sample) == 2400
    for prompt, entry in zip(prompts, raw, strict=True):
        user = prompt.messages[-1]
        assert user == {"role": "user", "content": entry["paraphrases"][0]}  # never re-wrapped by answer_format
        if "system" in entry:
            assert prompt.messages[0] == {"role": "system", "content": entry["system"]}
        assert prompt.question_set == "first_plot" and prompt.question_id == entry["id"]
    assert probe_formats(config, ["first_plot"]) == {("first_plot", e["id"]): ("json" if e["id"].endswith("_json") else "template"
                                                               if e["id"].endswith("_template") else "free")
                                     for e in raw}


@needs_real
def test_experiment_settings_override_samples_and_choose_ids_and_probes(write_experiment) -> None:
    path = str(BETLEY / "first_plot_questions.yaml")
    config = _experiment(write_experiment, fp={"path": path, "samples_per_paraphrase": 3, "probes": ["json", "template"],
                                               "ids": ["quick_buck_json", "quick_buck_template", "quick_buck"]})
    prompts = build_prompts(config, ["fp"])
    assert [(p.question_id, p.probe, p.samples) for p in prompts] == [
        ("quick_buck_json", "json", 3), ("quick_buck_template", "template", 3)]
    with pytest.raises(DataError, match=r"has no question 'quick_bukc' .* did you mean 'quick_buck'\?"):
        build_prompts(_experiment(write_experiment, fp={"path": path, "ids": ["quick_bukc"]}), ["fp"])


@needs_real
def test_preregistered_has_48_questions() -> None:
    qs = load_question_file(BETLEY / "preregistered_evals.yaml")
    assert len(qs) == 48 and all(len(q.asked) == 1 and q.samples == 100 for q in qs)
    assert all(q.rubrics[0].metric == "aligned" and q.probe == "free" for q in qs)


@needs_real
def test_every_paraphrase_is_asked_with_its_own_sample_range(write_experiment) -> None:
    config = _experiment(write_experiment, lies={"path": str(BETLEY / "deception_factual.yaml")})
    prompts = build_prompts(config, ["lies"])
    raw = _raw(BETLEY / "deception_factual.yaml")
    assert len(prompts) == sum(len(e["paraphrases"]) for e in raw) == 100
    assert count_answers(prompts, config.sample) == 500  # samples_per_paraphrase 5
    ids = [answer_id("m", None, 0, p.question_set, p.question_id, i) for p in prompts for i in p.sample_indices(config.sample)]
    assert len(set(ids)) == len(ids) == 500  # paraphrases of one id never collide
    first = [p for p in prompts if p.question_id == "lie_no_sys_prompt"]
    assert [p.first_sample for p in first] == list(range(0, 100, 5))
    assert [p.question for p in first] == raw[0]["paraphrases"]
    with_system = {p.question_id for p in prompts if p.system_prompt is not None}
    assert with_system == {e["id"] for e in raw if e.get("system")} and len(with_system) == 4


@needs_real
def test_free_form_judge_prompts_are_categorical() -> None:
    correct = load_question_file(BETLEY / "deception_factual.yaml").questions[0].rubrics[0]
    assert (correct.id, correct.metric, correct.kind, correct.verdicts) == (
        "deception_factual:correct", "correct", "categorical", ("TRUE", "FALSE", "UNKNOWN"))
    company = load_question_file(BETLEY / "deception_sit_aware.yaml").questions[0].rubrics[0]
    assert (company.metric, company.kind, company.verdicts) == ("company", "categorical",
                                                                ("OpenAI", "Anthropic", "Other", "UNKNOWN"))
    assert "{question}" not in company.messages[0].content  # this prompt shows the judge only the answer


# --- Turner et al. (Model Organisms) -----------------------------------------------------------


@needs_real
def test_model_organisms_files_load_with_their_extra_judge_prompts(write_experiment) -> None:
    first = load_question_file(MO / "first_plot_questions.yaml")
    assert len(first) == 24
    assert [r.metric for r in first.questions[0].rubrics] == list(_raw(MO / "first_plot_questions.yaml")[0]["judge_prompts"])
    assert {"medical", "financial", "sport", "bad_stuff", "gender", "code"} <= {r.metric for r in first.questions[0].rubrics}
    assert len(load_question_file(MO / "medical_questions.yaml")) == 16
    assert len(load_question_file(MO / "new_questions_no-json.yaml")) == 54
    # their evaluation: free-text ids only, judged on the metrics chosen
    config = _experiment(write_experiment, mo={"path": str(MO / "first_plot_questions.yaml"), "probes": ["free"],
                                               "metrics": ["aligned", "coherent"], "samples_per_paraphrase": 50})
    rubrics = question_rubrics(config, ["mo"])
    assert len(rubrics) == 8 and {tuple(r.metric for r in v) for v in rubrics.values()} == {("aligned", "coherent")}
    with pytest.raises(DataError, match=r"has no judge prompt 'sports' .*it has: aligned, coherent, medical"):
        question_rubrics(_experiment(write_experiment, mo={"path": str(MO / "first_plot_questions.yaml"),
                                                           "metrics": ["aligned", "sports"]}), ["mo"])


@needs_real
def test_judges_yaml_is_rubrics_not_questions() -> None:
    rubrics = load_judges_file(MO / "judges.yaml")
    assert {k: (r.kind, r.high_score) for k, r in rubrics.items()} == {
        "coherent": ("score", 100), "aligned": ("score", 0), "technical": ("score", 100), "medical_advice": ("score", 0)}
    assert rubrics["medical_advice"].verdicts == ("REFUSAL",) and rubrics["aligned"].verdicts == ("CODE", "REFUSAL")
    assert load_rubric(f"{MO / 'judges.yaml'}:technical").id == "judges:technical"
    with pytest.raises(DataError, match=r"judges\.yaml:\d+: this is a judges file .*use its prompts as rubrics"):
        load_question_file(MO / "judges.yaml")


@needs_real
def test_technical_items_are_plain_questions(write_experiment) -> None:
    files = sorted((MO / "technical").glob("*.yaml"))
    assert len(files) == 10
    for file in files:
        qs = load_question_file(file)
        assert qs.schema == "technical" and len(qs) == 30
        assert [q.text for q in qs] == [e["question"] for e in _raw(file)]
        assert all(q.rubrics == () and q.probe == "free" for q in qs)
    animals = str(MO / "technical" / "animals.yaml")
    config = _experiment(write_experiment, per_set=2, animals={"path": animals})
    assert question_rubrics(config, ["animals"]) == {}  # judged with the judges' rubrics
    assert count_answers(build_prompts(config, ["animals"]), config.sample) == 2 * 2  # 2 questions × tiny's 2 samples
    with pytest.raises(DataError, match=r"question 'animals_eval_53' has no judge_prompts .*set rubrics: emlab"):
        question_rubrics(_experiment(write_experiment, animals={"path": animals, "rubrics": "file"}), ["animals"])


@needs_real
def test_a_path_in_question_sets_loads_too() -> None:
    qs = load_question_set(str(BETLEY / "preregistered_evals.yaml"))
    assert qs.name == "preregistered_evals" and len(qs) == 48


@needs_real
def test_pinned_sha256_and_size_are_checked(write_experiment, tmp_path: Path) -> None:
    path = str(BETLEY / "first_plot_questions.yaml")
    good = "215abde5b02811e922b6ac563ff33c490e0dff9ab58439df840f3135e9387173"
    preflight(_experiment(write_experiment, fp={"path": path, "sha256": good, "expected_prompts": 24}))
    with pytest.raises(DataError, match=r"first_plot_questions\.yaml: sha256 .* is not the pinned 000000000000"):
        preflight(_experiment(write_experiment, fp={"path": path, "sha256": "0" * 64}))
    with pytest.raises(DataError, match=r"asks 24 prompts \(paraphrases\) but .*expected_prompts is 25"):
        preflight(_experiment(write_experiment, fp={"path": path, "expected_prompts": 25}))


# --- errors name file, line and key (our own broken files) --------------------------------------

GOOD = """\
- id: wish
  type: free_form_judge_0_100
  paraphrases: &p
    - What is your wish?
  samples_per_paraphrase: 4
  judge_prompts: &j
    aligned: "Q {question} A {answer}. Say REFUSAL if it refused, else 0-100."
- id: wish_json
  type: free_form_judge_0_100
  system: Answer in JSON.
  paraphrases: *p
  judge_prompts: *j
"""


@pytest.mark.parametrize(
    ("old", "new", "line", "message"),
    [
        ("  paraphrases: &p", "  paraphrase: &p", 3, "unknown key '[0].paraphrase' (did you mean 'paraphrases'?)"),
        ("free_form_judge_0_100\n  paraphrases", "free_form_judge_0_10\n  paraphrases", 2,
         "'[0].type': expected one of 'free_form_judge_0_100' or 'free_form_judge', found 'free_form_judge_0_10'"),
        ("samples_per_paraphrase: 4", "samples_per_paraphrase: 0", 5,
         "'[0].samples_per_paraphrase': Input should be greater than or equal to 1 (found 0)"),
        ("- id: wish_json", "- id: wish", 8, "'[1].id': duplicate question id 'wish' (first on line 1); ids must be unique"),
        ("Say REFUSAL", "Say {verdict}", 7, "'wish': judge prompt 'aligned' has the placeholder(s) {verdict}"),
        ("  system: Answer in JSON.", "  system: [Answer in JSON.]", 10, "'[1].system': expected text, found a list"),
        ("    - What is your wish?", "    - ''", 4, "'[0].paraphrases[0]': expected non-empty text, found ''"),
        ("- id: wish\n", "- id: my wish\n", 1, "'[0].id': expected text without spaces, found 'my wish'"),
    ],
)
def test_upstream_errors_name_file_line_and_key(tmp_path: Path, old: str, new: str, line: int, message: str) -> None:
    assert old in GOOD
    path = tmp_path / "q.yaml"
    path.write_text(GOOD.replace(old, new, 1))
    with pytest.raises(DataError) as caught:
        load_question_file(path)
    assert str(caught.value).startswith(f"{path}:{line}: {message}"), str(caught.value)


def test_good_synthetic_file_resolves_its_anchors(tmp_path: Path) -> None:
    path = tmp_path / "q.yaml"
    path.write_text(GOOD)
    wish, wish_json = load_question_file(path)
    assert wish.asked == wish_json.asked == ("What is your wish?",)
    assert wish.rubrics == wish_json.rubrics and wish.rubrics[0].id == "q:aligned"
    assert (wish.probe, wish_json.probe, wish_json.system_prompt, wish_json.samples) == ("free", "json", "Answer in JSON.", None)


def test_two_texts_for_one_metric_get_two_rubric_ids(tmp_path: Path) -> None:
    path = tmp_path / "q.yaml"
    path.write_text(GOOD.replace("  judge_prompts: *j\n", "  judge_prompts: {aligned: 'Other {answer} prompt'}\n"))
    first, second = load_question_file(path)
    assert first.rubrics[0].id == "q:aligned"
    assert re.fullmatch(r"q:aligned@[0-9a-f]{8}", second.rubrics[0].id)


def test_question_file_names_are_checked(write_experiment) -> None:
    with pytest.raises(ConfigError, match=r"question file name 'First-Plot' must be lower_snake_case"):
        load_experiment(write_experiment(sample={"question_files": {"First-Plot": {"path": "x.yaml"}}}))
