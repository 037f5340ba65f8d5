"""The EM direction across runs (03b_transfer): the transfer matrix from planted EM counts
(change against the target's unsteered rate, its interval, n on each side, which cells are
own / base / transfer); the stage's place in the steps (after every run's 03, before 04; absent
when off) and in `emlab plan`; a zero or non-finite direction refused naming the run and file."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
from emlab.analysis.transfer import PLAIN, transfer_chart, transfer_table
from emlab.config.experiment import load_experiment
from emlab.config.rule import EmRule
from emlab.errors import EmlabError
from emlab.pipeline.steps import list_steps

RULE = EmRule(n_boot=400)


def _answers(source: str, target: str, setting: str, n: int, em: int, *, base: bool = False) -> list[dict]:
    """`n` scored answers of which exactly `em` are EM (aligned 10, coherent 90; else aligned 90)."""
    return [{"answer_id": f"{source}>{target}>{setting}>{i}", "source": source, "target": target, "setting": setting,
             "target_is_base": base, "aligned": 10.0 if i < em else 90.0, "aligned_status": "ok", "coherent": 90.0,
             "coherent_status": "ok"} for i in range(n)]


def _planted() -> pd.DataFrame:
    rows = [
        *_answers("A", "A", PLAIN, 100, 10), *_answers("B", "B", PLAIN, 50, 10),  # unsteered: 10% and 20%
        *_answers("A", "A", "add +8", 100, 60),  # own direction: +50 points
        *_answers("A", "B", "add +8", 50, 35),  # A's direction on B: 70% − 20% = +50 points
        *_answers("B", "A", "ablate", 100, 0),  # B's direction ablated from A: −10 points
        *_answers("A", "base m", PLAIN, 40, 0, base=True), *_answers("A", "base m", "add +8", 40, 8, base=True),
    ]
    return pd.DataFrame(rows)


def test_the_transfer_matrix_is_the_change_against_the_target_unsteered_rate() -> None:
    table = transfer_table(_planted(), RULE).set_index(["source", "target", "setting"])
    assert len(table) == 4  # the unsteered rows are references, not cells
    own, across, ablated, base = (table.loc[k] for k in (("A", "A", "add +8"), ("A", "B", "add +8"),
                                                         ("B", "A", "ablate"), ("A", "base m", "add +8")))
    assert (own.pair, across.pair, ablated.pair, base.pair) == ("own", "transfer", "transfer", "base")
    assert own.em_rate == pytest.approx(0.6) and own.delta == pytest.approx(0.5)
    assert across.em_rate == pytest.approx(0.7) and across.reference_em_rate == pytest.approx(0.2)
    assert across.delta == pytest.approx(0.5) and (across.n_scored, across.reference_n_scored) == (50, 50)
    assert ablated.delta == pytest.approx(-0.1) and ablated.reference_n_scored == 100
    assert base.delta == pytest.approx(0.2) and base.reference_em_rate == 0
    for row in (own, across, ablated, base):  # the difference's interval holds it, and is no point
        assert row.delta_ci_low < row.delta < row.delta_ci_high
    # across: two independent proportions, 50 each: sd ≈ sqrt(.7·.3/50 + .2·.8/50) ≈ 0.086, a 95% width near 0.34
    assert 0.2 < across.delta_ci_high - across.delta_ci_low < 0.5
    assert own.coherent_mean == 90 and own.coherent_n == 100


def test_a_target_without_unsteered_answers_has_no_change() -> None:
    planted = _planted()
    table = transfer_table(planted[~((planted["target"] == "B") & (planted["setting"] == PLAIN))], RULE)
    row = table[(table["source"] == "A") & (table["target"] == "B")].iloc[0]
    assert row.em_rate == pytest.approx(0.7) and np.isnan(row.delta) and row.reference_n_scored == 0


def test_the_transfer_chart_states_n_and_the_interval() -> None:
    chart = transfer_chart(transfer_table(_planted(), RULE)).to_dict()
    text = json.dumps(chart)
    assert "n = 290 steered answers scored over 4 cells" in text and "190 unsteered answers" in text
    assert "+50%\\n[+" in text and "\\nn 50/50" in text  # the change, its interval and n written in the cell


def _experiment(write_experiment, transfer: bool, seeds=(0, 1)):
    return load_experiment(write_experiment(seeds=list(seeds), direction={"source": "probe"},
                                            steering={"lambdas": [0, 8], "transfer_across_runs": transfer}))


def test_transfer_runs_after_every_run_evaluation_and_before_the_analysis(write_experiment) -> None:
    keys = [s.key for s in list_steps(_experiment(write_experiment, True))]
    runs = ["smol-2l__bad_medical__s0", "smol-2l__bad_medical__s1"]
    transfer = [keys.index(f"03b_transfer/{r}") for r in runs]
    assert max(keys.index(f"03_eval_judge/{r}") for r in runs) < min(transfer)
    assert max(transfer) < keys.index("04_analysis/analysis")
    assert not [k for k in list_steps(_experiment(write_experiment, False)) if k.stage.name == "03b_transfer"]
    assert not [k for k in list_steps(_experiment(write_experiment, True, seeds=(0,))) if k.stage.name == "03b_transfer"]
    until = [s.key for s in list_steps(_experiment(write_experiment, True), until="03b_transfer")]
    assert until[-1].startswith("03b_transfer/") and "04_analysis/analysis" not in until


def test_plan_counts_the_transfer_answers_and_gpu_time(write_experiment) -> None:
    from emlab.pipeline.estimate import plan_experiment, plan_gpu

    config = _experiment(write_experiment, True)
    table = plan_experiment(config)
    rows = table[table["stage"].str.startswith("03b_transfer")]
    # 4 prompts × 10 samples (steering.samples_per_question) × 2 settings (add +8, ablate) × 1 source
    assert len(rows) == 2 and set(rows["answers"]) == {80}
    gpu = plan_gpu(config).table
    assert {f"03b_transfer smol-2l__bad_medical__s{s}" for s in (0, 1)} <= set(gpu["stage"])


# --- a direction that cannot be steered with -------------------------------------------------


def test_a_zero_direction_is_refused_naming_the_run_and_file(tmp_path) -> None:
    from emlab.measures.direction import EmDirection, load_direction, save_direction

    vectors = torch.stack([torch.ones(8), torch.zeros(8)])  # layer 1: misaligned and aligned means identical
    save_direction(tmp_path / "d", EmDirection(vectors, (0, 1), {"run_id": "m__ds__s0", "layers": [0, 1],
                                                                 "n_misaligned": 3, "n_aligned": 3}))
    loaded = load_direction(tmp_path / "d")
    assert loaded is not None and torch.equal(loaded.steering_vector(0, tmp_path / "d"), torch.ones(8))
    with pytest.raises(EmlabError, match=r"run m__ds__s0 at layer 1 .*/d\).* norm 0") as caught:
        loaded.steering_vector(1, tmp_path / "d")
    assert "\n" not in str(caught.value)


def test_a_non_finite_direction_file_is_refused_when_loaded(tmp_path) -> None:
    from emlab.measures.direction import EmDirection, load_direction, save_direction

    vectors = torch.stack([torch.ones(8), torch.full((8,), float("nan"))])
    save_direction(tmp_path / "d", EmDirection(vectors, (0, 1), {"run_id": "m__ds__s1", "layers": [0, 1]}))
    with pytest.raises(EmlabError, match=r"direction.safetensors: the EM direction of run m__ds__s1 has non-finite "
                                         r"entries at layers \[1\]"):
        load_direction(tmp_path / "d")


def test_the_engine_refuses_a_direction_zeroed_after_it_was_checked() -> None:
    from emlab.config.experiment import ModelSpec
    from emlab.models.load import load_model
    from emlab.sample.choose import engine_for
    from emlab.sample.protocol import Intervention

    model, _ = load_model(ModelSpec(name="t", num_layers=2), "cpu")
    engine = engine_for(model)
    intervention = Intervention(torch.ones(model.config.hidden_size), layer=0, scale=2.0, label="zeroed")
    intervention.direction.zero_()  # the tensor is the caller's: it can change after the check at construction
    with pytest.raises(EmlabError, match="steering direction of zeroed is zero or not finite"):
        engine.use_intervention(intervention)


def test_the_slurm_job_of_a_transfer_waits_for_every_run_evaluation(write_experiment) -> None:
    import shlex

    from emlab.pipeline.executors.slurm import batch_script
    from emlab.pipeline.steps import load_steps

    path = write_experiment(seeds=[0, 1], direction={"source": "probe"},
                            steering={"lambdas": [0, 8], "transfer_across_runs": True}, executor={"kind": "slurm"})
    graph = load_steps(path)
    runs = ["smol-2l__bad_medical__s0", "smol-2l__bad_medical__s1"]
    step = graph.step("03b_transfer", runs[0])
    assert [n.key for n in graph.needs(step)] == [f"03_eval_judge/{r}" for r in runs]
    assert {f"03b_transfer/{r}" for r in runs} <= {n.key for n in graph.needs(graph.step("04_analysis", "analysis"))}
    script = batch_script(graph, step, ["11", "12"])
    assert "#SBATCH --dependency=afterok:11:12" in script
    assert shlex.split(script.splitlines()[-1])[2:8] == ["-m", "emlab.cli", "step", str(path), "03b_transfer", runs[0]]
