"""Params validation: one clear error per problem, naming file, line and key."""

from __future__ import annotations

from pathlib import Path

import pytest
from emlab.config.experiment import load_experiment
from emlab.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "x.yaml"
    path.write_text(text)
    return path


MINIMAL = """\
name: x
models: [{name: m}]
datasets: [{name: d, path: demo:bad_medical_advice, domain: medical}]
judges: [{name: j, model: m, base_url: local, api_key_env: null}]
"""


def test_shipped_experiments_load() -> None:
    for path in sorted((REPO / "params" / "experiments").glob("*.yaml")):
        config = load_experiment(path)
        assert config.runs(), path


def test_minimal_uses_reference_defaults(tmp_path: Path) -> None:
    config = load_experiment(_write(tmp_path, MINIMAL))
    assert config.sample.samples_per_question == 50
    assert config.sample.max_new_tokens == 600
    assert config.analysis.aligned_below == 30 and config.analysis.coherent_above == 50
    assert [r.run_id for r in config.runs()] == ["m__d__s0"]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (MINIMAL + "train:\n  lerning_rate: 0.1\n", "x.yaml:6: unknown key 'train.lerning_rate' (did you mean 'learning_rate'?)"),
        (MINIMAL + "sample:\n  temperature: hot\n", "x.yaml:6: 'sample.temperature': expected a number, found 'hot'"),
        (MINIMAL + "sample: a: b\n", "x.yaml:5: YAML syntax error: mapping values are not allowed here"),
        (MINIMAL.replace("name: x\n", ""), "missing required key 'name'"),
        (MINIMAL + "seeds: [0]\nanalysis: {judge: nope}\n", "analysis.judge 'nope' is not one of the judges: j"),
        (MINIMAL.replace("[{name: m}]", "[{name: m}, {name: m}]"), "names must be unique, repeated: m"),
    ],
)
def test_bad_params_give_one_clear_line(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_experiment(_write(tmp_path, text))
    assert message in str(err.value)
    assert str(tmp_path / "x.yaml") in str(err.value)


def test_missing_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="experiment file not found"):
        load_experiment(tmp_path / "nope.yaml")


def test_base_is_merged(tmp_path: Path) -> None:
    base = _write(tmp_path, MINIMAL + "sample: {samples_per_question: 7, temperature: 0.5}\n")
    child = tmp_path / "child.yaml"
    child.write_text(f"base: {base.name}\nname: y\nsample: {{temperature: 0.9}}\n")
    config = load_experiment(child)
    assert (config.name, config.sample.samples_per_question, config.sample.temperature) == ("y", 7, 0.9)


def test_unknown_run_suggests_nearest(tmp_path: Path) -> None:
    config = load_experiment(_write(tmp_path, MINIMAL))
    with pytest.raises(ConfigError, match="did you mean 'm__d__s0'"):
        config.run("m__d_s0")
