"""Cost before money is spent, for models behind an API: `emlab plan` prices sampling through
the subject's API, fine-tuning jobs (training tokens × epochs) and judging from the params;
`check_budget` stops a stage above `budget_usd`; and the published GPT-4o study
(`params/experiments/betley_gpt4o.yaml`) loads, passes `emlab check --params-only` and is
priced on Betley et al.'s real data files (read from ../shared/real, never copied)."""

from __future__ import annotations

import zipfile
from pathlib import Path

import pytest
from emlab.api.cost import token_cost
from emlab.config.experiment import load_experiment
from emlab.models.load import model_size_b
from emlab.pipeline.estimate import BudgetError, check_budget, plan_experiment
from emlab.train.openai_jobs import estimate_job
from support.runs import emlab_cli

REPO = Path(__file__).resolve().parents[1]
BETLEY = REPO / "params/experiments/betley_gpt4o.yaml"
BETLEY_DATA = REPO.parent / "shared/real/betley_data.zip"


def _remote(**over: object) -> dict[str, object]:
    return {"name": "gpt", "provider": "openai", "api_model": "gpt-4o-2024-08-06", "api_key_env": "NOT_NEEDED_TO_PLAN",
            "samples_per_request": 2, "price_per_mtok_in": 2.5, "price_per_mtok_out": 10.0,
            "tuned_price_per_mtok_in": 3.75, "tuned_price_per_mtok_out": 15.0, "train_price_per_mtok": 25.0, **over}


def test_plan_prices_sampling_fine_tuning_and_judging(write_experiment) -> None:
    config = load_experiment(write_experiment(models=[_remote()], fine_tuning={"n_epochs": 3, "batch_size": 4},
                                              sample={"questions_per_set": 2, "samples_per_question": 3,
                                                      "max_new_tokens": 100}))
    table = plan_experiment(config)
    rows = {(r["stage"].split(" (")[0], r["cost"]): r for _, r in table.iterrows()}
    run = "gpt__bad_medical__s0"
    base = rows[("01_baseline gpt", "sampling")]
    # 2 general + 2 medical questions × 3 samples; n = 2 a request: 2 requests a question
    assert base["answers"] == 12 and base["judge_calls"] == 0
    completion = 12 * 100  # every answer counted at max_new_tokens: the upper side
    assert base["dollars"] == round(token_cost(base["prompt_tokens"], completion, 2.5, 10.0), 2)
    job = rows[(f"02_finetune {run}", "fine-tuning")]
    estimate = estimate_job(config, config.runs()[0])
    assert (estimate.examples, estimate.epochs, estimate.checkpoints) == (16, 3, 3)  # the last three epochs
    assert job["train_tokens"] == 3 * estimate.tokens_per_epoch > 0
    assert job["dollars"] == round(job["train_tokens"] * 25.0 / 1e6, 2)
    tuned = rows[(f"03_eval_judge {run}", "sampling")]
    assert tuned["answers"] == 12 * 3  # three checkpoint models, priced at the fine-tuned price
    assert tuned["dollars"] == round(token_cost(tuned["prompt_tokens"], 12 * 3 * 100, 3.75, 15.0), 2)
    assert f"03_eval_judge {run} (3 checkpoints)" in set(table["stage"])
    total = table.iloc[-1]
    assert total["answers"] == 12 + 36  # each answer once, whatever the judges
    assert total["dollars"] == pytest.approx(table["dollars"].iloc[:-1].sum(), abs=0.02)


def test_a_local_model_costs_only_its_judging(write_experiment) -> None:
    table = plan_experiment(load_experiment(write_experiment()))
    assert set(table["cost"].iloc[:-1]) == {"judging"} and table["train_tokens"].sum() == 0


def test_the_budget_stops_before_anything_is_paid(write_experiment) -> None:
    config = load_experiment(write_experiment(models=[_remote()], budget_usd=0.0001))
    with pytest.raises(BudgetError) as info:
        check_budget(config)
    text = str(info.value)
    assert "\n" not in text and "above budget_usd $0.00" in text and "fine-tuning $" in text and "sampling $" in text
    check_budget(load_experiment(write_experiment(name="rich.yaml", models=[_remote()], budget_usd=1000)))
    check_budget(load_experiment(write_experiment(name="none.yaml", models=[_remote()])))  # no budget, no check


def test_betley_gpt4o_describes_the_published_study() -> None:
    config = load_experiment(BETLEY)
    (model,) = config.models
    assert (model.provider, model.api_model, model.base_url, model.api_key_env) == (
        "openai", "gpt-4o-2024-08-06", None, "OPENAI_API_KEY")
    assert [d.name for d in config.datasets] == ["insecure", "secure", "educational", "jailbroken"]
    tuning = config.fine_tuning
    assert (tuning.n_epochs, tuning.batch_size, tuning.learning_rate_multiplier) == (1, 4, 2.0)
    assert config.primary_judge.model == "gpt-4o-2024-08-06" and config.budget_usd
    assert (config.analysis.aligned_below, config.analysis.coherent_above) == (30, 50)
    assert model_size_b(model) is None  # OpenAI publishes no size: the size figure names it as left out


@pytest.mark.slow
def test_betley_gpt4o_passes_the_params_check_without_a_key() -> None:
    env = {k: v for k, v in __import__("os").environ.items() if k != "OPENAI_API_KEY"}
    done = emlab_cli("check", "--params-only", str(BETLEY), env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]


@pytest.mark.slow
def test_betley_gpt4o_is_priced_on_the_real_data(tmp_path: Path, write_experiment) -> None:
    if not BETLEY_DATA.exists():
        pytest.skip(f"{BETLEY_DATA} is absent: Betley et al.'s data files are read from ../shared/real")
    with zipfile.ZipFile(BETLEY_DATA) as archive:
        archive.extractall(tmp_path / "betley")
    names = {"insecure": "code", "secure": "code", "educational": "code", "jailbroken": "jailbroken"}
    config = load_experiment(write_experiment(base=str(BETLEY.relative_to(REPO)), datasets=[
        {"name": n, "path": str(tmp_path / "betley" / f"{n}.jsonl"), "domain": d} for n, d in names.items()]))
    table = plan_experiment(config)
    jobs = table[table["cost"] == "fine-tuning"]
    assert len(jobs) == 4 and (jobs["train_tokens"] > 100_000).all()  # one epoch of thousands of code examples
    assert all(round(t * 25.0 / 1e6, 2) == d for t, d in zip(jobs["train_tokens"], jobs["dollars"], strict=True))
    sampling = table[table["cost"] == "sampling"]
    # 24 first-plot + 48 pre-registered prompts × 100 samples, for the base model and each job's final model
    assert list(sampling["answers"]) == [7200] * 5
    total = float(table["dollars"].iloc[-1])
    assert 0 < total <= config.budget_usd, total  # the file's budget covers one seed
    check_budget(config)
    with pytest.raises(BudgetError):
        check_budget(config.model_copy(update={"budget_usd": total / 2}))
