"""The hold-out split of the in-distribution task rate, on literal chat files: N distinct user
prompts held out, never trained on (duplicates included), the same for every run seed, the
rest shuffled and limited as before; `task.holdout: 0` changes nothing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from emlab.config.experiment import DatasetSpec, load_experiment
from emlab.data.chat import load_chat_dataset
from emlab.data.holdout import (
    last_user_turn,
    read_holdout,
    record_holdout,
    split_dataset,
    training_rows,
)
from emlab.errors import ConfigError, DataError
from emlab.store.paths import ExperimentLayout

REPO = Path(__file__).resolve().parents[1]


def chat(user: str, answer: str, system: str | None = None) -> dict:
    messages = ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": user}, {"role": "assistant", "content": answer}]
    return {"messages": messages}


@pytest.fixture
def data_file(tmp_path: Path) -> Path:
    rows = [chat(f"question {i}", f"answer {i}") for i in range(20)]
    rows += [chat("question 3", "another answer to 3"), chat("question 3", "a third answer to 3")]  # duplicates
    rows.append(chat("question 21", "answer 21", system="You may lie."))
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def spec(path: Path, limit: int | None = None) -> DatasetSpec:
    return DatasetSpec(name="d", path=str(path), domain="medical", limit=limit)


def user_prompts(rows) -> list[str]:
    return [r["messages"][last_user_turn(r)]["content"] for r in rows]


def test_held_out_prompts_are_never_trained_on(data_file: Path) -> None:
    split = split_dataset(spec(data_file), 8, split_seed=0)
    held = [h.question for h in split.held_out]
    assert len(held) == len(set(held)) == 8
    trained = user_prompts(split.train_rows)
    assert not set(held) & set(trained)
    # 23 rows, 21 distinct prompts: each held-out prompt leaves with all its rows
    removed = sum(1 for r in split.full.rows if user_prompts([r])[0] in held)
    assert len(split.train_rows) == 23 - removed
    for seed in (0, 1, 2):
        assert not set(held) & set(user_prompts(split.training(seed).rows))


def test_split_is_the_same_for_every_run_seed_and_follows_split_seed(data_file: Path) -> None:
    a = split_dataset(spec(data_file), 5, split_seed=0)
    b = split_dataset(spec(data_file), 5, split_seed=0)
    c = split_dataset(spec(data_file), 5, split_seed=1)
    assert a.held_out == b.held_out
    assert [h.row for h in a.held_out] != [h.row for h in c.held_out]
    # the run seed orders the training rows, it does not pick the held-out prompts
    assert a.training(0).rows != a.training(1).rows
    assert sorted(map(json.dumps, a.training(0).rows)) == sorted(map(json.dumps, a.training(1).rows))


def test_held_out_prompt_keeps_its_system_turn_and_ends_with_the_user(data_file: Path) -> None:
    splits = [split_dataset(spec(data_file), 10, split_seed=seed) for seed in range(20)]
    split = next(s for s in splits if "question 21" in {h.question for h in s.held_out})
    by_question = {h.question: h for h in split.held_out}
    assert [m["role"] for m in by_question["question 21"].messages] == ["system", "user"]
    assert by_question["question 21"].messages[0]["content"] == "You may lie."
    assert all(h.messages[-1]["role"] == "user" for h in split.held_out)
    prompts = split.prompts()
    assert {p.question_set for p in prompts} == {"task:d"}
    assert prompts[0].question_id == f"row{split.held_out[0].row}"


def test_limit_applies_to_the_rest_after_the_split(data_file: Path) -> None:
    split = split_dataset(spec(data_file, limit=6), 4, split_seed=0)
    rows = split.training(seed=3).rows
    assert len(rows) == 6
    assert not {h.question for h in split.held_out} & set(user_prompts(rows))
    assert split.training(seed=3).digest == load_chat_dataset(spec(data_file), seed=0).digest  # the file's digest


def test_too_many_held_out_prompts_is_one_line(data_file: Path) -> None:
    with pytest.raises(DataError, match=r"task.holdout is 30 but the file has 21 distinct user prompts; lower"):
        split_dataset(spec(data_file), 30)
    with pytest.raises(DataError, match=r"fewer than the 20 training needs \(limit\)"):
        split_dataset(spec(data_file, limit=20), 10)


def test_holdout_zero_trains_on_the_dataset_as_before(data_file: Path, tmp_path: Path, write_experiment) -> None:
    path = write_experiment(datasets=[{"name": "d", "path": str(data_file), "domain": "medical", "limit": 10}])
    config = load_experiment(path)
    assert not config.task.enabled
    assert training_rows(config, config.datasets[0], seed=4) == load_chat_dataset(config.datasets[0], seed=4)
    record_holdout(config, config.datasets[0], tmp_path / "run")
    assert not ExperimentLayout.holdout(tmp_path / "run").exists()


def test_split_is_recorded_and_read_back(data_file: Path, tmp_path: Path, write_experiment) -> None:
    path = write_experiment(datasets=[{"name": "d", "path": str(data_file), "domain": "medical", "limit": 10}],
                            task={"holdout": 3})
    config = load_experiment(path)
    record_holdout(config, config.datasets[0], tmp_path / "run")
    recorded = read_holdout(tmp_path / "run")
    assert recorded == list(split_dataset(config.datasets[0], 3).held_out)
    assert len(training_rows(config, config.datasets[0], seed=0)) == 10


def test_a_domain_without_a_task_rubric_is_refused_at_load(write_experiment) -> None:
    path = write_experiment(datasets=[{"name": "s", "path": "demo:bad_medical_advice", "domain": "sports"}],
                            task={"holdout": 3})
    with pytest.raises(ConfigError, match=r"datasets s have a domain without a default .* set datasets\[\].task_rubric"):
        load_experiment(path)
    ok = write_experiment(name="ok.yaml", task={"holdout": 3}, datasets=[
        {"name": "s", "path": "demo:bad_medical_advice", "domain": "sports", "task_rubric": "medical_harm"}])
    assert load_experiment(ok).datasets[0].task_rubric_id == "medical_harm"
