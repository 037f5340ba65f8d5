"""Adapter dynamics (emlab.analysis.dynamics): norms, directions, local cosines and PCA of
adapters written as real peft-format files, computed exactly; the top singular direction of a
rank-r adapter; onsets of planted changes recovered within their bootstrap intervals; the
dynamics params; and 04_analysis on the session's tiny run writing the tables and the figure."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from emlab.analysis import dynamics
from emlab.analysis.dynamics import (
    CHANGEPOINT,
    PEAK,
    adapter_dynamics,
    adapter_state,
    changepoint,
    lag_note,
    onset_from_groups,
    onset_from_matrix,
    partner_steps,
    peak,
    trajectory_pca,
)
from emlab.config.experiment import DynamicsSpec
from emlab.config.rule import EmRule
from emlab.store.paths import ADAPTER_WEIGHTS, TrainingFiles
from safetensors.torch import save_file
from support.runs import TINY_RUN_GROUP, TinyRun

DOWN = "base_model.model.model.layers.{layer}.mlp.down_proj"


def _write_adapter(folder: Path, pairs: dict[str, tuple[list[list[float]], list[list[float]]]], r: int) -> Path:
    """An adapter folder as peft saves one: adapter_config.json and adapter_model.safetensors
    holding '<module>.lora_A.weight' (r × in) and '<module>.lora_B.weight' (out × r)."""
    from peft import LoraConfig

    folder.mkdir(parents=True)
    LoraConfig(r=r, lora_alpha=2 * r, target_modules=["down_proj"]).save_pretrained(str(folder))
    tensors = {}
    for module, (a, b) in pairs.items():
        tensors[f"{module}.lora_A.weight"] = torch.tensor(a, dtype=torch.float32)
        tensors[f"{module}.lora_B.weight"] = torch.tensor(b, dtype=torch.float32)
    save_file(tensors, str(folder / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    return folder


# B vectors of a rank-1 adapter on layer 0 at steps 5, 10, 15, 20, chosen for exact cosines:
# cos(b10, b5) = cos(b15, b10) = 1/√2, cos(b20, b15) = 3/5, cos(b15, b5) = 0, cos(b20, b10) = 3/(5√2)
B_VECTORS = {5: [2, 0, 0], 10: [1, 1, 0], 15: [0, 3, 0], 20: [0, 3, 4]}
A_VECTOR = [1, 2, 2]  # ‖A‖ = 3 at step 5, scaled by step / 5


def _rank1_run(root: Path) -> TrainingFiles:
    files = TrainingFiles(root / "run")
    for step, b in B_VECTORS.items():
        scale = step / 5
        pairs = {DOWN.format(layer=0): ([[scale * x for x in A_VECTOR]], [[x] for x in b]),
                 # layer 1 never moves: B fixed, A fixed
                 DOWN.format(layer=1): ([[0.0, 0.0, 1.0]], [[1.0], [0.0], [0.0]])}
        _write_adapter(files.checkpoint(step), pairs, r=1)
    return files


def test_the_synthetic_checkpoints_are_peft_format(tmp_path: Path) -> None:
    from peft.utils import load_peft_weights

    files = _rank1_run(tmp_path)
    assert sorted(files.completed()) == [5, 10, 15, 20]  # what 02_finetune's checkpoints look like to emlab
    weights = load_peft_weights(str(files.checkpoint(10)), device="cpu")
    assert weights[f"{DOWN.format(layer=0)}.lora_B.weight"].shape == (3, 1)


def test_rank1_norms_and_rotation_are_exact(tmp_path: Path) -> None:
    files = _rank1_run(tmp_path)
    found = adapter_dynamics(files.completed(), k_steps=(5, 10), pca_components=2)
    table = found.checkpoints.set_index(["layer", "step"])
    moving = table.loc[0]
    assert moving["module"].unique().tolist() == ["down_proj"] and moving["rank"].unique().tolist() == [1]
    assert moving["adapter"].iloc[0] == "model.layers.0.mlp.down_proj"  # peft's prefix removed
    assert moving["b_norm"].tolist() == pytest.approx([2, math.sqrt(2), 3, 5])
    assert moving["a_norm"].tolist() == pytest.approx([3, 6, 9, 12])
    assert moving["ba_norm"].tolist() == pytest.approx([6, 6 * math.sqrt(2), 27, 60])
    half = 1 / math.sqrt(2)
    assert moving["cos_b_k5"].tolist() == pytest.approx([np.nan, half, half, 0.6], nan_ok=True)
    assert moving["rotation_k5"].tolist() == pytest.approx([np.nan, 1 - half, 1 - half, 0.4], nan_ok=True)
    assert moving["gap_k5"].tolist() == pytest.approx([np.nan, 5, 5, 5], nan_ok=True)
    # k = 10: step 10 has no checkpoint 10 steps before it, so its nearest earlier one (5) is used
    assert moving["cos_b_k10"].tolist() == pytest.approx([np.nan, half, 0.0, 3 / (5 * math.sqrt(2))], nan_ok=True)
    assert moving["gap_k10"].tolist() == pytest.approx([np.nan, 5, 10, 10], nan_ok=True)
    assert moving["cos_a_k5"].tolist() == pytest.approx([np.nan, 1, 1, 1], nan_ok=True)  # A only grows
    still = table.loc[1]
    assert still["cos_b_k5"].tolist()[1:] == pytest.approx([1, 1, 1])
    assert still["b_norm"].tolist() == pytest.approx([1, 1, 1, 1])
    assert found.note == ("k = 10: no checkpoints 10 steps apart; the nearest earlier checkpoint was used "
                          "(gaps of 5, 10 steps).")
    # PCA: a fixed direction has nothing to explain; the moving one's components explain all of it
    pca = found.pca.set_index(["layer", "component"])["explained_variance_ratio"]
    assert pca.loc[(1, 1)] == 0.0
    assert pca.loc[(0, 1)] + pca.loc[(0, 2)] <= 1 + 1e-12 and pca.loc[(0, 1)] >= pca.loc[(0, 2)] > 0


def test_filters_pick_layers_and_modules(tmp_path: Path) -> None:
    files = _rank1_run(tmp_path)
    only = adapter_dynamics(files.completed(), k_steps=(5,), layers=(1,))
    assert only.checkpoints["layer"].unique().tolist() == [1]
    assert adapter_dynamics(files.completed(), k_steps=(5,), modules=("q_proj",)).checkpoints.empty


def test_rank1_direction_keeps_the_b_vectors_sign() -> None:
    state = adapter_state(np.array([[0.0, -2.0]]), np.array([[-3.0], [4.0]]))
    assert state.b_direction.tolist() == pytest.approx([-0.6, 0.8])
    assert state.a_direction.tolist() == pytest.approx([0.0, -1.0])
    assert (state.a_norm, state.b_norm, state.ba_norm) == pytest.approx((2, 5, 10))


def test_zero_b_has_no_direction() -> None:
    state = adapter_state(np.ones((2, 3)), np.zeros((4, 2)))  # LoRA's initialisation
    assert state.ba_norm == 0 and np.isnan(state.b_direction).all()


def test_rank_r_direction_is_the_top_left_singular_vector_of_ba() -> None:
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(4, 12)), rng.normal(size=(9, 4))
    state = adapter_state(a, b)
    u, s, vt = np.linalg.svd(b @ a)
    assert abs(state.b_direction @ u[:, 0]) == pytest.approx(1.0)
    assert abs(state.a_direction @ vt[0]) == pytest.approx(1.0)
    assert state.ba_norm == pytest.approx(np.linalg.norm(b @ a))
    # the pair reproduces the top singular value with matching signs
    assert state.b_direction @ (b @ a) @ state.a_direction == pytest.approx(s[0])
    # exact: B·A = diag(3, 1) on the first two axes, so the direction is e1
    exact = adapter_state(np.eye(2, 4), np.array([[3.0, 0.0], [0.0, 1.0], [0.0, 0.0]]))
    assert np.abs(exact.b_direction).tolist() == pytest.approx([1, 0, 0])


def test_rank_r_signs_chain_from_checkpoint_to_checkpoint(tmp_path: Path) -> None:
    module = DOWN.format(layer=3)
    a = [[1.0, 0.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0]]
    b = [[0.0, 1.0], [-3.0, 0.0], [0.0, 0.0]]  # top left singular vector ±e2; the first gets +e2
    flipped_a = [[-x for x in row] for row in a]
    flipped_b = [[-x for x in row] for row in b]  # the same B·A
    folders = {1: _write_adapter(tmp_path / "s1", {module: (a, b)}, r=2),
               2: _write_adapter(tmp_path / "s2", {module: (flipped_a, flipped_b)}, r=2)}
    table = adapter_dynamics(folders, k_steps=(1,)).checkpoints
    assert table["layer"].tolist() == [3, 3] and table["rank"].tolist() == [2, 2]
    assert table["cos_b_k1"].tolist() == pytest.approx([np.nan, 1.0], nan_ok=True)
    assert table["ba_norm"].tolist() == pytest.approx([math.sqrt(10)] * 2)  # ‖B·A‖_F of rows (0, 1), (−3, 0)


def test_partner_steps_take_the_nearest_earlier_checkpoint() -> None:
    assert partner_steps([0, 100, 200, 300], 5) == [None, 0, 100, 200]
    assert partner_steps([10, 20, 25, 30], 10) == [None, 10, 20, 20]  # 25 − 10 = 15: as near 10 as 20, the later wins
    assert partner_steps([10, 20, 30], 15) == [None, 10, 20]  # 30 − 15 = 15: 10 and 20 tie, the later wins
    assert lag_note([5, 10, 15], [5]) == ""
    assert lag_note([0, 100, 200], [5, 10]).startswith("k = 5: no checkpoints 5 steps apart;")


def test_trajectory_pca_of_a_line_is_one_component() -> None:
    line = np.array([[0.0, 0.0], [1.0, 2.0], [2.0, 4.0], [3.0, 6.0]])
    ratios, coords = trajectory_pca(line, 2)
    assert ratios.tolist() == pytest.approx([1.0, 0.0])
    assert coords[:, 0].tolist() == pytest.approx(np.array([-1.5, -0.5, 0.5, 1.5]) * math.sqrt(5))


# --- onsets --------------------------------------------------------------------------------------


def test_changepoint_and_peak_exact() -> None:
    found = changepoint([0, 10, 20, 30, 40], [0.1, 0.1, 0.5, 0.5, 0.5])
    assert (found.step, found.before, found.after) == (20, pytest.approx(0.1), pytest.approx(0.5))
    assert math.isnan(changepoint([0, 1, 2], [0.2, 0.2, 0.2]).step)  # flat: no onset
    assert peak([5, 10, 15, 20], [0.0, 0.1, 0.9, 0.2]) == 15
    assert math.isnan(peak([1, 2], [0.3, 0.3]))


def test_planted_step_change_is_recovered_within_its_interval() -> None:
    rng = np.random.default_rng(1)
    steps = list(range(0, 110, 10))  # 0 (base model) … 100
    onset_at = 60
    groups = [rng.random(200) < (0.3 if s >= onset_at else 0.02) for s in steps]  # EM flags per answer
    onset = onset_from_groups(steps, groups, rule=EmRule(n_boot=500))
    assert onset is not None and onset.method == CHANGEPOINT
    assert onset.step == onset_at and onset.ci_low <= onset_at <= onset.ci_high
    assert onset.ci_high - onset.ci_low <= 20 and onset.n == 200 * len(steps) and onset.n_steps == len(steps)
    assert onset.before == pytest.approx(np.mean(np.concatenate(groups[:6])))
    assert onset.flat_share == 0.0


def test_noise_free_step_has_a_point_interval() -> None:
    groups = [np.zeros(10), np.zeros(10), np.ones(10), np.ones(10)]
    onset = onset_from_groups([0, 1, 2, 3], groups, rule=EmRule(n_boot=100))
    assert (onset.step, onset.ci_low, onset.ci_high) == (2, 2, 2)
    assert onset_from_groups([0, 1], [np.zeros(3), []]) is None  # one step with answers: no trajectory


def test_paired_onset_resamples_rows_together() -> None:
    rng = np.random.default_rng(2)
    steps = [0, 5, 10, 15, 20, 25]
    # 40 probes whose gaps differ a lot from each other but all move by +0.5 at step 15
    base = rng.normal(0, 2, size=(40, 1))
    matrix = base + np.where(np.array(steps) >= 15, 0.5, 0.0) + rng.normal(0, 0.05, size=(40, len(steps)))
    onset = onset_from_matrix(steps, matrix, rule=EmRule(n_boot=300))
    assert onset.step == 15 and (onset.ci_low, onset.ci_high) == (15, 15)  # pairing removes the spread
    spike = np.tile([np.nan, 0.01, 0.02, 0.4, 0.03, 0.02], (5, 1)) + rng.normal(0, 0.005, size=(5, 6))
    rotation = onset_from_matrix(steps, spike, method=PEAK, rule=EmRule(n_boot=200))
    assert rotation.step == 15 and rotation.n_steps == 5 and rotation.n == 5


def _scores(em_from: int = 15) -> pd.DataFrame:
    """60 judged answers of the base model (run None, step 0) and of run 'r' at steps 5–20, EM at
    half the answers from step `em_from`."""
    rng = np.random.default_rng(3)
    rows = []
    for step in (None, 5, 10, 15, 20):  # None: the base model
        p = 0.5 if step is not None and step >= em_from else 0.0
        for i in range(60):
            em = rng.random() < p
            rows.append({"model": "m", "dataset": None if step is None else "d", "run_id": None if step is None else "r",
                         "step": 0 if step is None else step, "aligned": 10.0 if em else 90.0, "aligned_status": "ok",
                         "coherent": 90.0, "coherent_status": "ok", "answer_id": f"{step}-{i}",
                         "is_baseline": step is None})
    return pd.DataFrame(rows)


def test_run_onsets_on_synthetic_scores(tmp_path: Path) -> None:
    files = _rank1_run(tmp_path)
    rows = _scores()
    run = dynamics.RunCheckpoints("m", "d", 0, "r", files.completed())
    found = dynamics.experiment_dynamics([run], DynamicsSpec(k_steps=(5,)), scores=pd.DataFrame(rows),
                                         rule=EmRule(n_boot=200))
    onsets = found.onsets.set_index("signal")
    assert onsets.loc["em_rate", "onset_step"] == 15 and onsets.loc["em_rate", "n"] == 300
    assert onsets.loc["rotation_k5", "method"] == PEAK and onsets.loc["rotation_k5", "unit"] == "adapters"
    assert onsets.loc["rotation_k5", "onset_step"] == 20  # mean over the 2 adapters peaks where b turns to (0, 3, 4)
    assert onsets.loc["b_norm", "onset_step"] == 20  # mean ‖B‖ 1.5, 1.21, 2, 3: the jump to 3 splits best
    assert set(found.rotation["n_adapters"]) == {2} and found.rotation["k"].unique().tolist() == [5]
    assert found.dynamics["run_id"].unique().tolist() == ["r"] and len(found.dynamics) == 8
    off = dynamics.experiment_dynamics([run], DynamicsSpec(enabled=False), scores=pd.DataFrame(rows),
                                       rule=EmRule(n_boot=200))
    assert off.dynamics.empty and off.onsets["signal"].tolist() == ["em_rate"]


def test_dynamics_figure_lines_up_em_rotation_and_onsets(tmp_path: Path) -> None:
    from emlab.analysis.metrics import em_rate
    from emlab.analysis.plots import dynamics_chart, save_chart

    rule = EmRule(n_boot=200)
    run = dynamics.RunCheckpoints("m", "d", 0, "r", _rank1_run(tmp_path).completed())
    found = dynamics.experiment_dynamics([run], DynamicsSpec(k_steps=(5, 10)), scores=_scores(), rule=rule)
    rates = em_rate(_scores(), by=["model", "dataset", "run_id", "step"], rule=rule)
    chart = dynamics_chart(rates, None, None, found.rotation, found.onsets, rule=rule)
    spec = json.dumps(chart.to_dict(), ensure_ascii=False)
    assert "EM rate over training" in spec and "Adapter rotation" in spec and "Onsets: where each signal changes" in spec
    assert "n = 2 adapters (layer × module) a run" in spec and "95% bootstrap CI over adapters (200 resamples)" in spec
    assert "k→gap: 10→5" in spec  # step 10 has no checkpoint 10 steps before it
    assert chart.to_dict()["resolve"]["scale"]["x"] == "shared"  # one step axis for every panel
    html, png = save_chart(chart, tmp_path / "fig_dynamics")
    assert png.stat().st_size > 1000 and html.exists()


def test_dynamics_params() -> None:
    spec = DynamicsSpec(k_steps=[15, 5, 10, 5])
    assert spec.k_steps == (5, 10, 15) and spec.enabled and spec.pca_components == 2
    with pytest.raises(ValueError, match="lags are training steps"):
        DynamicsSpec(k_steps=[0])
    with pytest.raises(ValueError):
        DynamicsSpec(k_step=[5])  # a typo is refused


def test_turner_studies_ask_for_the_papers_lags() -> None:
    from emlab.config.experiment import load_experiment
    from support.runs import REPO

    for name in ("turner_full", "turner_rank1"):
        config = load_experiment(REPO / "params" / "experiments" / f"{name}.yaml")
        assert config.dynamics.enabled and config.dynamics.k_steps == (5, 10, 15)
    assert load_experiment(REPO / "params/experiments/turner_rank1.yaml").train.lora.r == 1


# --- 04_analysis on the session's tiny run -------------------------------------------------------


@pytest.mark.slow
@pytest.mark.server
@TINY_RUN_GROUP
def test_analysis_writes_dynamics_and_the_report_shows_them(tiny_run: TinyRun) -> None:
    from emlab.config.experiment import load_experiment
    from emlab.store.paths import ExperimentLayout

    config = load_experiment(tiny_run.experiment)
    layout = ExperimentLayout.of(config)
    run = config.runs()[0].run_id
    table = pd.read_csv(layout.analysis_table("dynamics"))
    steps = sorted(layout.training(run).completed())
    assert len(steps) >= 2 and sorted(table["step"].unique()) == steps
    assert len(table) == table["adapter"].nunique() * len(steps) and set(table["run_id"]) == {run}
    assert {"a_norm", "b_norm", "cos_b_k5", "rotation_k15", "gap_k10", "pc1"} <= set(table.columns)
    assert (table["a_norm"] > 0).all()
    onsets = pd.read_csv(layout.analysis_table("onsets"))
    assert {"em_rate", "b_norm"} <= set(onsets["signal"]) and any(s.startswith("probe_gap:") for s in onsets["signal"])
    assert (onsets["n_boot"] == config.analysis.bootstrap).all()
    assert layout.analysis_table("dynamics_pca").exists()
    assert layout.figure("dynamics").with_suffix(".png").stat().st_size > 1000
    index = layout.index.read_text()
    assert "fig_dynamics.png" in index and "Onsets" in index
    notebook = (layout.analysis / "04_analysis.html").read_text()
    assert "Adapter dynamics" in notebook and "onset" in notebook
