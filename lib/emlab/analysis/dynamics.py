"""Adapter dynamics: how a run's LoRA adapters move from checkpoint to checkpoint, and the
step at which each signal of the run (EM rate, task rate, probe gap, the adapters' rotation
and norm) changes.

After Turner et al. (Model Organisms for EM, arXiv 2506.11613, §4: A/B norms, the rotation of
the rank-1 B vector as the local cosine similarity between checkpoints k = 5/10/15 steps
apart, a PCA of B over training). Everything here is numpy on the CPU over the adapters a run
already saved (`checkpoints/step-NNNNNN/adapter_model.safetensors`, peft's format).

**An adapter** is one LoRA pair of one layer and module: ΔW = s·B·A with B (out × r) and
A (r × in), s = alpha/r (or alpha/√r). Its **direction** at a checkpoint is the top left
singular vector of B·A (unit length, in the module's output space); its A-side partner is the
top right singular vector. For rank 1, B·A = b·aᵀ, so the direction is B/‖B‖ and the partner
A/‖A‖: the B and A vectors themselves. The scale s changes no direction and is left out of
the norms (‖A‖, ‖B‖ and ‖B·A‖ are Frobenius norms of the saved matrices).

**Sign.** A singular vector's sign is arbitrary (u, v and −u, −v give the same B·A). Rank 1
keeps the B vector's own sign (B and A move continuously in training, and Turner et al.
compare the raw B vectors). For rank r > 1 each checkpoint's sign is chosen so that its dot
product with the previous checkpoint's direction is ≥ 0 (the first checkpoint: its
largest-magnitude entry positive): the trajectory is as continuous as the SVD allows, so only a
real rotation lowers the cosine. A checkpoint whose B is all zero (LoRA's initialisation) has
no direction (NaN).

**Local cosine** at checkpoint t for lag k: cos(d_t, d_t'), where t' is the saved checkpoint
nearest to t − k among those before t (ties: the later one). When checkpoints are not k steps
apart the gap used is recorded per row (`gap_k<k>`) and `lag_note` says so. **Rotation** is
1 − local cosine of the B direction.

**Onsets** (`changepoint`, `peak`, `onset_from_groups`, `onset_from_matrix`): a signal over the
steps is split into two flat segments by least squares (mean before, mean after); the onset is
the first step of the second segment. A sudden change at step s gives s exactly; a gradual rise
gives a step inside the rise. The rotation is a spike, not a level change, so its onset is the
step of the largest rotation (`peak`). Intervals are percentile bootstraps of the onset:
resampling each step's answers (EM and task rate: each checkpoint's answers are its own
sample), or the rows of a matrix together across steps (probe gap: the same probes at every
step; rotation and norm: the adapters, i.e. layers × modules).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ..config.experiment import DynamicsSpec
from ..config.rule import EmRule
from ..errors import DataError
from ..store.paths import ADAPTER_WEIGHTS
from .metrics import em_flags

# peft's key of one LoRA matrix: '<module path>.lora_A.weight' (adapter name removed on save)
_LORA_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<side>[AB])\.weight$")
_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")
_PEFT_PREFIX = "base_model.model."
_FLAT = 1e-12  # a signal whose spread is below this (relative) has no change to locate

CHANGEPOINT = "changepoint"  # two flat segments by least squares; onset: first step of the second
PEAK = "peak"  # the step of the largest value (the rotation)
RUN_KEYS = ("model", "dataset", "seed", "run_id")


# --- reading adapters -------------------------------------------------------------------------


@dataclass(frozen=True)
class AdapterName:
    """One LoRA pair of an adapter file: where it sits in the model."""

    adapter: str
    """The module's path without peft's prefix, e.g. 'model.layers.3.mlp.down_proj'."""
    layer: int | None
    """The decoder layer index; None for a module outside the layers (e.g. lm_head)."""
    module: str
    """The module's own name, e.g. 'down_proj' (what `dynamics.modules` filters on)."""


def adapter_names(keys: Iterable[str]) -> dict[str, AdapterName]:
    """The LoRA pairs named by safetensors `keys` (peft's '...lora_A.weight' / '...lora_B.weight'),
    by adapter path; a module with only one of A and B is an error."""
    sides: dict[str, set[str]] = {}
    for key in keys:
        found = _LORA_KEY.match(key)
        if found:
            sides.setdefault(found["module"], set()).add(found["side"])
    names = {}
    for module, have in sorted(sides.items()):
        if have != {"A", "B"}:
            raise DataError(f"adapter module {module!r} has lora_{''.join(sorted(have))} only; expected lora_A and lora_B")
        path = module.removeprefix(_PEFT_PREFIX)
        layer = _LAYER.search(path)
        names[module] = AdapterName(adapter=path, layer=int(layer[1]) if layer else None,
                                    module=path.rsplit(".", 1)[-1])
    return names


def _selected(name: AdapterName, modules: Sequence[str] | None, layers: Sequence[int] | None) -> bool:
    return (modules is None or name.module in modules) and (layers is None or name.layer in layers)


# --- one adapter at one checkpoint ------------------------------------------------------------


@dataclass(frozen=True)
class AdapterState:
    """One adapter at one checkpoint: norms and direction (see the module docstring)."""

    rank: int
    a_norm: float
    b_norm: float
    ba_norm: float
    b_direction: np.ndarray  # (out,), unit length; NaN when B·A is zero
    a_direction: np.ndarray  # (in,), unit length; NaN when B·A is zero


def adapter_state(a: np.ndarray, b: np.ndarray) -> AdapterState:
    """Norms and direction of the LoRA pair A (r × in), B (out × r).

    The top singular pair of B·A comes from B = Q·R (reduced QR) and the SVD of the small
    R·A (r × in), never forming the out × in product: B·A = (Q·U)·S·Vᵀ. ‖B·A‖_F is ‖R·A‖_F.
    """
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
        raise DataError(f"LoRA shapes do not fit: A {a.shape}, B {b.shape} (expected A r × in, B out × r)")
    rank = a.shape[0]
    q, r = np.linalg.qr(b)
    small = r @ a
    ba_norm = float(np.linalg.norm(small))
    if ba_norm == 0.0:
        nan = np.full(b.shape[0], np.nan), np.full(a.shape[1], np.nan)
        return AdapterState(rank, float(np.linalg.norm(a)), float(np.linalg.norm(b)), 0.0, *nan)
    u, _, vt = np.linalg.svd(small, full_matrices=False)
    left, right = q @ u[:, 0], vt[0]
    if rank == 1 and left @ b[:, 0] < 0:  # rank 1: the B vector's own sign
        left, right = -left, -right
    return AdapterState(rank, float(np.linalg.norm(a)), float(np.linalg.norm(b)), ba_norm,
                        left / np.linalg.norm(left), right / np.linalg.norm(right))


def _chain_signs(b_dirs: np.ndarray, a_dirs: np.ndarray) -> None:
    """Rank r > 1: flip each row (in place) so it has a non-negative dot with the previous
    defined row; the first defined row gets its largest-magnitude entry positive."""
    previous = None
    for i in range(len(b_dirs)):
        row = b_dirs[i]
        if np.isnan(row).any():
            continue
        flip = (row @ previous < 0) if previous is not None else (row[np.argmax(np.abs(row))] < 0)
        if flip:
            b_dirs[i], a_dirs[i] = -row, -a_dirs[i]
        previous = b_dirs[i]


# --- the trajectory of one adapter ------------------------------------------------------------


def partner_steps(steps: Sequence[int], k: int) -> list[int | None]:
    """For each checkpoint step t, the saved step nearest to t − k among the steps before t
    (ties: the later one); None for the first checkpoint."""
    ordered = sorted(steps)
    partners: list[int | None] = []
    for i, t in enumerate(ordered):
        before = ordered[:i]
        partners.append(min(reversed(before), key=lambda s: abs(s - (t - k))) if before else None)
    return partners


def lag_note(steps: Sequence[int], k_steps: Sequence[int]) -> str:
    """What each requested lag k became on these checkpoints: '' when every checkpoint after
    the first has one exactly k steps before it, else one sentence per k saying the gaps used."""
    notes = []
    for k in k_steps:
        gaps = sorted({t - p for t, p in zip(sorted(steps), partner_steps(steps, k), strict=True) if p is not None})
        if gaps and gaps != [k]:
            shown = ", ".join(str(g) for g in gaps)
            notes.append(f"k = {k}: no checkpoints {k} steps apart; the nearest earlier checkpoint was used "
                         f"(gaps of {shown} steps)")
    return "; ".join(notes) + ("." if notes else "")


def _cosines(dirs: np.ndarray, index: Sequence[int | None]) -> np.ndarray:
    """cos(d_i, d_index[i]) for unit rows, NaN where index is None or a row is undefined."""
    out = np.full(len(dirs), np.nan)
    for i, j in enumerate(index):
        if j is not None:
            out[i] = float(np.clip(dirs[i] @ dirs[j], -1.0, 1.0))
    return out


def trajectory_pca(dirs: np.ndarray, components: int) -> tuple[np.ndarray, np.ndarray]:
    """PCA of a trajectory (rows: checkpoints, columns: the direction's entries; undefined
    rows NaN). Returns (explained variance ratio per component, coordinates: rows × components,
    NaN for undefined rows). At most (defined rows − 1) components; each component's sign puts
    the last defined checkpoint at a coordinate ≥ 0."""
    defined = ~np.isnan(dirs).any(axis=1)
    x = dirs[defined]
    n = min(components, max(len(x) - 1, 0))
    coords = np.full((len(dirs), components), np.nan)
    ratios = np.full(components, np.nan)
    if n == 0:
        return ratios, coords
    centred = x - x.mean(axis=0)
    _, s, vt = np.linalg.svd(centred, full_matrices=False)
    total = float((s**2).sum())
    if total == 0.0:  # the direction never moved
        ratios[:n] = 0.0
        coords[defined, :n] = 0.0
        return ratios, coords
    projected = centred @ vt[:n].T
    projected *= np.where(projected[-1] < 0, -1.0, 1.0)
    ratios[:n] = s[:n] ** 2 / total
    coords[defined, :n] = projected
    return ratios, coords


@dataclass(frozen=True)
class AdapterDynamics:
    """The per-checkpoint table of a run's adapters and the PCA of each adapter's trajectory."""

    checkpoints: pd.DataFrame
    """One row per adapter × checkpoint: adapter, layer, module, rank, step, a_norm, b_norm,
    ba_norm, then per k: cos_b_k<k>, cos_a_k<k>, rotation_k<k> (1 − cos_b), gap_k<k> (steps
    actually between the two checkpoints), then pc1.. (the B direction's PCA coordinates)."""
    pca: pd.DataFrame
    """One row per adapter × component: explained_variance_ratio, n_checkpoints."""
    note: str
    """How the lags were mapped onto the saved checkpoints ('' when exactly)."""


def dynamics_columns(k_steps: Sequence[int], components: int) -> list[str]:
    """The columns of `AdapterDynamics.checkpoints`."""
    per_k = [f"{name}_k{k}" for k in k_steps for name in ("cos_b", "cos_a", "rotation", "gap")]
    return ["adapter", "layer", "module", "rank", "step", "a_norm", "b_norm", "ba_norm", *per_k,
            *(f"pc{i + 1}" for i in range(components))]


PCA_COLUMNS = ["adapter", "layer", "module", "component", "explained_variance_ratio", "n_checkpoints"]


def adapter_dynamics(checkpoints: Mapping[int, Path], *, k_steps: Sequence[int] = (5, 10, 15),
                     modules: Sequence[str] | None = None, layers: Sequence[int] | None = None,
                     pca_components: int = 2) -> AdapterDynamics:
    """Norms, directions, local cosines and PCA of every adapter across `checkpoints` (step →
    adapter folder holding `adapter_model.safetensors`), restricted to `modules` (names such
    as 'down_proj') and `layers` when given. The files are opened once and each adapter's
    matrices read lazily, one adapter at a time (a 32B rank-32 run's checkpoints need not fit
    in memory together)."""
    from safetensors import (
        safe_open,  # reads bfloat16 too (through torch), once the analysis runs
    )

    steps = sorted(checkpoints)
    rows: list[dict[str, Any]] = []
    pca_rows: list[dict[str, Any]] = []
    partners = {k: partner_steps(steps, k) for k in k_steps}
    position = {s: i for i, s in enumerate(steps)}
    with ExitStack() as stack:
        files = [stack.enter_context(safe_open(str(Path(checkpoints[s]) / ADAPTER_WEIGHTS), framework="pt"))
                 for s in steps]
        names = adapter_names(files[0].keys()) if files else {}
        for index, handle in enumerate(files[1:], start=1):
            if set(adapter_names(handle.keys())) != set(names):
                raise DataError(f"{checkpoints[steps[index]]}: its adapter modules differ from those of step {steps[0]}")
        for module, name in names.items():
            if not _selected(name, modules, layers):
                continue
            states = [adapter_state(h.get_tensor(f"{module}.lora_A.weight").float().numpy(),
                                    h.get_tensor(f"{module}.lora_B.weight").float().numpy()) for h in files]
            b_dirs = np.stack([s.b_direction for s in states])
            a_dirs = np.stack([s.a_direction for s in states])
            if states[0].rank > 1:
                _chain_signs(b_dirs, a_dirs)
            ratios, coords = trajectory_pca(b_dirs, pca_components)
            per_k = {}
            for k, partner in partners.items():
                rows_before = [None if p is None else position[p] for p in partner]
                per_k[k] = (_cosines(b_dirs, rows_before), _cosines(a_dirs, rows_before),
                            [np.nan if p is None else t - p for t, p in zip(steps, partner, strict=True)])
            for i, (step, state) in enumerate(zip(steps, states, strict=True)):
                row: dict[str, Any] = {"adapter": name.adapter, "layer": name.layer, "module": name.module,
                                       "rank": state.rank, "step": step, "a_norm": state.a_norm,
                                       "b_norm": state.b_norm, "ba_norm": state.ba_norm}
                for k, (cos_b, cos_a, gaps) in per_k.items():
                    row |= {f"cos_b_k{k}": cos_b[i], f"cos_a_k{k}": cos_a[i], f"rotation_k{k}": 1 - cos_b[i],
                            f"gap_k{k}": gaps[i]}
                row |= {f"pc{c + 1}": coords[i, c] for c in range(pca_components)}
                rows.append(row)
            defined = int((~np.isnan(b_dirs).any(axis=1)).sum())
            pca_rows += [{"adapter": name.adapter, "layer": name.layer, "module": name.module, "component": c + 1,
                          "explained_variance_ratio": ratios[c], "n_checkpoints": defined}
                         for c in range(pca_components) if not np.isnan(ratios[c])]
    return AdapterDynamics(pd.DataFrame(rows, columns=dynamics_columns(k_steps, pca_components)),
                           pd.DataFrame(pca_rows, columns=PCA_COLUMNS), lag_note(steps, k_steps))


# --- onsets -----------------------------------------------------------------------------------


def _split_scores(y: np.ndarray) -> np.ndarray:
    """For rows of `y` (B × n), the between-segment sum of squares of every split j = 1..n−1
    (segments y[:j], y[j:]); the least-squares split maximises it."""
    n = y.shape[1]
    total = y.sum(axis=1, keepdims=True)
    left = np.cumsum(y, axis=1)[:, :-1]
    j = np.arange(1, n)
    return left**2 / j + (total - left) ** 2 / (n - j)


def _flat(y: np.ndarray) -> np.ndarray:
    """Rows of `y` with (numerically) no spread."""
    spread = y.max(axis=1) - y.min(axis=1)
    return spread <= _FLAT * np.maximum(1.0, np.abs(y).max(axis=1))


def _changepoint_rows(steps: np.ndarray, y: np.ndarray) -> np.ndarray:
    """The changepoint onset of each row of `y` (NaN for a flat row)."""
    split = np.argmax(_split_scores(y), axis=1) + 1  # ties: the earliest split
    return np.where(_flat(y), np.nan, steps[split].astype(float))


def _peak_rows(steps: np.ndarray, y: np.ndarray) -> np.ndarray:
    """The step of each row's largest value (ties: the earliest; NaN for a flat row)."""
    return np.where(_flat(y), np.nan, steps[np.argmax(y, axis=1)].astype(float))


_ESTIMATORS: dict[str, Callable[[np.ndarray, np.ndarray], np.ndarray]] = {
    CHANGEPOINT: _changepoint_rows, PEAK: _peak_rows}


@dataclass(frozen=True)
class Changepoint:
    step: float
    """First step of the second segment; NaN when the signal is flat."""
    before: float
    """Mean of the signal before `step`."""
    after: float
    """Mean from `step` on."""


def changepoint(steps: Sequence[float] | np.ndarray, values: Sequence[float] | np.ndarray) -> Changepoint:
    """The least-squares split of `values` (at `steps`, ascending) into two flat segments; the
    earliest split among equals. Needs ≥ 2 values."""
    x, y = np.asarray(steps), np.asarray(values, dtype=float)
    if len(y) < 2:
        raise ValueError(f"a changepoint needs at least 2 values, got {len(y)}")
    onset = float(_changepoint_rows(x, y[None])[0])
    if np.isnan(onset):
        return Changepoint(onset, float(y.mean()), float(y.mean()))
    split = int(np.searchsorted(x, onset))
    return Changepoint(onset, float(y[:split].mean()), float(y[split:].mean()))


def peak(steps: Sequence[float] | np.ndarray, values: Sequence[float] | np.ndarray) -> float:
    """The step of the largest of `values` (ties: the earliest); NaN when all are equal."""
    return float(_peak_rows(np.asarray(steps), np.asarray(values, dtype=float)[None])[0])


@dataclass(frozen=True)
class Onset:
    """Where one signal of one run changes, with its bootstrap interval."""

    method: str
    """`CHANGEPOINT` or `PEAK`."""
    step: float
    """The onset (a checkpoint step); NaN when the signal is flat."""
    ci_low: float
    ci_high: float
    before: float
    """Changepoint: the signal's mean before the onset; peak: its median over the steps."""
    after: float
    """Changepoint: the mean from the onset on; peak: the value at the peak."""
    n: int
    """Items behind the signal: answers (all steps), probes, or adapters."""
    n_steps: int
    n_boot: int
    flat_share: float
    """Share of resamples with a flat signal (no onset); the interval is over the others."""


def _onset(steps: np.ndarray, signal: np.ndarray, draws: np.ndarray, method: str, n: int, rule: EmRule) -> Onset:
    estimate = _ESTIMATORS[method]
    step = float(estimate(steps, signal[None])[0])
    if method == CHANGEPOINT:
        found = changepoint(steps, signal)
        before, after = found.before, found.after
    else:
        before = float(np.median(signal))
        after = float(signal[np.argmax(signal)])
    boot = estimate(steps, draws)
    defined = boot[~np.isnan(boot)]
    tail = (1 - rule.ci) / 2
    low, high = ((float(np.quantile(defined, tail, method="inverted_cdf")),
                  float(np.quantile(defined, 1 - tail, method="inverted_cdf"))) if defined.size
                 else (float("nan"), float("nan")))
    return Onset(method, step, low, high, before, after, n, len(steps), rule.n_boot,
                 float(1 - defined.size / len(boot)))


def onset_from_groups(steps: Sequence[int], groups: Sequence[Any], *, method: str = CHANGEPOINT,
                      rule: EmRule = EmRule()) -> Onset | None:
    """The onset of the mean of `groups` (one array of per-answer values per step, e.g. 1.0
    for an EM answer) over `steps`, with a bootstrap interval resampling each step's values
    with replacement (`rule.n_boot` times at `rule.ci`, seed `rule.seed`). Steps with no values
    are left out; None when fewer than 2 steps remain."""
    kept = [(s, np.asarray(g, dtype=float)) for s, g in zip(steps, groups, strict=True) if len(g)]
    if len(kept) < 2:
        return None
    x = np.array([s for s, _ in kept])
    rng = np.random.default_rng(rule.seed)
    signal = np.array([g.mean() for _, g in kept])
    draws = np.stack([g[rng.integers(0, len(g), size=(rule.n_boot, len(g)))].mean(axis=1) for _, g in kept], axis=1)
    return _onset(x, signal, draws, method, sum(len(g) for _, g in kept), rule)


def onset_from_matrix(steps: Sequence[int], matrix: Any, *, method: str = CHANGEPOINT,
                      rule: EmRule = EmRule()) -> Onset | None:
    """The onset of the column means of `matrix` (rows: items measured at every step, such as
    probes or adapters; columns: `steps`; NaN where an item lacks a value), with a bootstrap
    interval resampling the rows together across steps. Columns with no value are left out;
    None when fewer than 2 remain."""
    m = np.asarray(matrix, dtype=float)
    keep = ~np.isnan(m).all(axis=0)
    x, m = np.asarray(steps)[keep], m[:, keep]
    rows = m[~np.isnan(m).all(axis=1)]
    if len(x) < 2 or not len(rows):
        return None
    rng = np.random.default_rng(rule.seed)
    picks = rng.integers(0, len(rows), size=(rule.n_boot, len(rows)))
    with np.errstate(invalid="ignore"):
        draws = np.nanmean(rows[picks], axis=1)  # B × steps
    draws = draws[~np.isnan(draws).any(axis=1)]  # a resample missing a step entirely
    return _onset(x, np.nanmean(rows, axis=0), draws, method, len(rows), rule)


# --- a run's signals --------------------------------------------------------------------------


ONSET_COLUMNS = [*RUN_KEYS, "signal", "unit", "method", "onset_step", "ci_low", "ci_high", "before", "after",
                 "n", "n_steps", "n_boot", "flat_share"]


def _onset_row(keys: Mapping[str, Any], signal: str, unit: str, onset: Onset | None) -> list[dict[str, Any]]:
    if onset is None:
        return []
    return [{**keys, "signal": signal, "unit": unit, "method": onset.method, "onset_step": onset.step,
             "ci_low": onset.ci_low, "ci_high": onset.ci_high, "before": onset.before, "after": onset.after,
             "n": onset.n, "n_steps": onset.n_steps, "n_boot": onset.n_boot, "flat_share": onset.flat_share}]


def _with_base(run_rows: pd.DataFrame, base_rows: pd.DataFrame) -> pd.DataFrame:
    """A run's rows with its base model's rows as step 0 (unless the run has a step 0)."""
    if (run_rows["step"] == 0).any() or base_rows.empty:
        return run_rows
    return pd.concat([base_rows.assign(step=0), run_rows], ignore_index=True)


def run_signal_onsets(keys: Mapping[str, Any], *, scores: pd.DataFrame, task: pd.DataFrame | None = None,
                      probe: pd.DataFrame | None = None, task_above: float = 50,
                      rule: EmRule = EmRule()) -> list[dict[str, Any]]:
    """Onset rows of one run's behaviour (`keys`: model, dataset, seed, run_id): the EM rate
    (`scores`: the wide scores table, every answer; the base model's answers are step 0), the
    task rate (`task`: `metrics.task_scores` rows, score > `task_above`) and each probe set's
    gap (`probe`: probe scores with `gap`, paired over probes). Unscored answers are left out."""
    rows: list[dict[str, Any]] = []
    model, run_id = keys["model"], keys["run_id"]

    def base_of(frame: pd.DataFrame) -> pd.DataFrame:
        return frame[frame["run_id"].isna() & (frame["model"] == model)]

    mine = _with_base(scores[scores["run_id"] == run_id], base_of(scores))
    flags = em_flags(mine, rule)
    scored = mine.assign(_em=flags)[flags.notna()]
    by_step = [(int(s), g["_em"].astype(float).to_numpy()) for s, g in scored.groupby("step", sort=True)]
    rows += _onset_row(keys, "em_rate", "answers", onset_from_groups(
        [s for s, _ in by_step], [g for _, g in by_step], rule=rule))
    if task is not None and len(task):
        base = base_of(task)
        base = base[base["dataset"] == keys["dataset"]] if "dataset" in base else base
        mine = _with_base(task[task["run_id"] == run_id], base)
        ok = mine[(mine["task_status"] == "ok") & mine["task_score"].notna()]
        by_step = [(int(s), (g["task_score"].astype(float) > task_above).astype(float).to_numpy())
                   for s, g in ok.groupby("step", sort=True)]
        rows += _onset_row(keys, "task_rate", "answers", onset_from_groups(
            [s for s, _ in by_step], [g for _, g in by_step], rule=rule))
    if probe is not None and len(probe):
        for probe_set, part in probe.groupby("probe_set", sort=True):
            mine = _with_base(part[part["run_id"] == run_id], base_of(part))
            if mine.empty:
                continue
            table = mine.pivot_table(index="probe_id", columns="step", values="gap", aggfunc="last")
            rows += _onset_row(keys, f"probe_gap:{probe_set}", "probes", onset_from_matrix(
                [int(s) for s in table.columns], table.to_numpy(), rule=rule))
    return rows


def adapter_onset_rows(keys: Mapping[str, Any], table: pd.DataFrame, k_steps: Sequence[int],
                       rule: EmRule = EmRule()) -> list[dict[str, Any]]:
    """Onset rows of one run's adapters: the rotation for each k (peak of the mean 1 − cos of
    the B direction over adapters) and the mean ‖B‖ (changepoint), resampling adapters."""
    if table.empty:
        return []
    rows = []
    for k in k_steps:
        wide = table.pivot_table(index="adapter", columns="step", values=f"rotation_k{k}", aggfunc="last",
                                 dropna=False)
        rows += _onset_row(keys, f"rotation_k{k}", "adapters", onset_from_matrix(
            [int(s) for s in wide.columns], wide.to_numpy(), method=PEAK, rule=rule))
    wide = table.pivot_table(index="adapter", columns="step", values="b_norm", aggfunc="last")
    rows += _onset_row(keys, "b_norm", "adapters", onset_from_matrix(
        [int(s) for s in wide.columns], wide.to_numpy(), rule=rule))
    return rows


def rotation_summary(table: pd.DataFrame, k_steps: Sequence[int], rule: EmRule = EmRule()) -> pd.DataFrame:
    """The rotation per run, step and k, averaged over adapters with a bootstrap interval over
    adapters: columns RUN_KEYS, step, k, gap (median steps between the checkpoints compared),
    rotation, ci_low, ci_high, n_adapters. `table`: the per-checkpoint rows with RUN_KEYS."""
    from .metrics import bootstrap_ci

    rows = []
    for keys, part in table.groupby(list(RUN_KEYS), dropna=False, sort=True):
        for step, at in part.groupby("step", sort=True):
            for k in k_steps:
                values = at[f"rotation_k{k}"].dropna().to_numpy(dtype=float)
                if not values.size:
                    continue
                low, high = bootstrap_ci(values, n_boot=rule.n_boot, ci=rule.ci, seed=rule.seed)
                rows.append({**dict(zip(RUN_KEYS, keys, strict=True)), "step": int(step), "k": k,
                             "gap": float(at[f"gap_k{k}"].median()), "rotation": float(values.mean()),
                             "ci_low": low, "ci_high": high, "n_adapters": int(values.size)})
    return pd.DataFrame(rows, columns=[*RUN_KEYS, "step", "k", "gap", "rotation", "ci_low", "ci_high", "n_adapters"])


# --- an experiment --------------------------------------------------------------------------------


@dataclass(frozen=True)
class RunCheckpoints:
    """One run's identity and its saved adapters (step → folder)."""

    model: str
    dataset: str
    seed: int
    run_id: str
    checkpoints: Mapping[int, Path]

    @property
    def keys(self) -> dict[str, Any]:
        return {"model": self.model, "dataset": self.dataset, "seed": self.seed, "run_id": self.run_id}


@dataclass(frozen=True)
class ExperimentDynamics:
    """The dynamics tables of an experiment (04_analysis writes the first three)."""

    dynamics: pd.DataFrame
    """Per run × adapter × checkpoint (`AdapterDynamics.checkpoints` with RUN_KEYS in front)."""
    pca: pd.DataFrame
    """Per run × adapter × PCA component."""
    onsets: pd.DataFrame
    """Per run × signal: ONSET_COLUMNS."""
    rotation: pd.DataFrame
    """`rotation_summary`: what the figure's rotation panel draws."""
    note: str
    """Markdown: what was computed, how the lags met the checkpoints, what was left out."""


def experiment_dynamics(runs: Sequence[RunCheckpoints], spec: DynamicsSpec, *, scores: pd.DataFrame,
                        task: pd.DataFrame | None = None, probe: pd.DataFrame | None = None,
                        task_above: float = 50, rule: EmRule = EmRule()) -> ExperimentDynamics:
    """Adapter dynamics of every run with at least 2 checkpoints (when `spec.enabled`) and the
    onsets of each run's signals (EM, task rate, probe gaps always; rotation and ‖B‖ where the
    adapters were read)."""
    tables, pcas, onsets, notes = [], [], [], []
    for run in runs:
        onsets += run_signal_onsets(run.keys, scores=scores, task=task, probe=probe, task_above=task_above, rule=rule)
        if not spec.enabled:
            continue
        if len(run.checkpoints) < 2:
            notes.append(f"`{run.run_id}`: {len(run.checkpoints)} saved checkpoint(s), no dynamics (needs 2)")
            continue
        found = adapter_dynamics(run.checkpoints, k_steps=spec.k_steps, modules=spec.modules, layers=spec.layers,
                                 pca_components=spec.pca_components)
        if found.checkpoints.empty:
            notes.append(f"`{run.run_id}`: no adapter matches dynamics.modules / dynamics.layers")
            continue
        tables.append(found.checkpoints.assign(**run.keys))
        pcas.append(found.pca.assign(**run.keys))
        onsets += adapter_onset_rows(run.keys, found.checkpoints, spec.k_steps, rule)
        if found.note:
            notes.append(f"`{run.run_id}`: {found.note}")
    columns = [*RUN_KEYS, *dynamics_columns(spec.k_steps, spec.pca_components)]
    dynamics = pd.concat(tables, ignore_index=True)[columns] if tables else pd.DataFrame(columns=columns)
    if tables:
        ranks = ", ".join(str(r) for r in sorted(dynamics["rank"].unique()))
        notes.insert(0, f"Adapter dynamics of {dynamics['run_id'].nunique()} run(s): {dynamics['adapter'].nunique()} "
                        f"adapters (layer × module) of rank {ranks}, lags k = {', '.join(map(str, spec.k_steps))} "
                        "steps. Direction: the B vector for rank 1, the top left singular vector of B·A for rank r; "
                        "rotation = 1 − local cosine; onsets: changepoint (two flat segments) for levels, the peak "
                        f"for the rotation; {rule.ci_label}s of the onset ({rule.n_boot} resamples).")
    elif not spec.enabled:
        notes.insert(0, "Adapter dynamics are off (`dynamics.enabled: false`); the behaviour's onsets are below.")
    pca = (pd.concat(pcas, ignore_index=True)[[*RUN_KEYS, *PCA_COLUMNS]] if pcas
           else pd.DataFrame(columns=[*RUN_KEYS, *PCA_COLUMNS]))
    return ExperimentDynamics(dynamics, pca, pd.DataFrame(onsets, columns=ONSET_COLUMNS),
                              rotation_summary(dynamics, spec.k_steps, rule), "\n\n".join(notes))
