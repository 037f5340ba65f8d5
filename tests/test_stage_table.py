"""The stage table describes the pipeline as it runs: every file a stage writes on the tiny
run is one it declares, every declared file is written, every declared input is written by
the stage it names, and the table's dependencies follow its order."""

from __future__ import annotations

from pathlib import Path

import pytest
from emlab.config.experiment import load_experiment
from emlab.stages import STAGE_NAMES, STAGES, get_stage
from emlab.store.paths import ExperimentLayout
from support.outputs import matching_files
from support.runs import REPO, TINY_RUN_GROUP, TinyRun


def test_dependencies_point_backwards_in_the_table() -> None:
    config = load_experiment(REPO / "tests/configs/tiny.yaml")
    for position, stage in enumerate(STAGES):
        for unit in stage.units(config):
            for needed, needed_unit in stage.needs(config, unit):
                assert STAGE_NAMES.index(needed) < position, (stage.name, needed)
                assert needed_unit in get_stage(needed).units(config)
        for read in stage.reads:
            assert STAGE_NAMES.index(read.stage) < position


@pytest.mark.slow
@pytest.mark.server
@TINY_RUN_GROUP
def test_each_stage_writes_exactly_the_files_it_declares(tiny_run: TinyRun) -> None:
    config = load_experiment(tiny_run.experiment)
    layout = ExperimentLayout.of(config)
    claimed: dict[Path, str] = {}
    for stage in STAGES:
        for unit in stage.units(config):
            folder = stage.folder(layout, unit)
            for output in stage.outputs():
                found = matching_files(folder, output.pattern)
                assert found or output.optional, f"{stage.name} {unit}: declares {output.pattern} but wrote none"
                for path in found:
                    claimed.setdefault(path, stage.name)
            for read in stage.reads:
                source = get_stage(read.stage)
                folders = [source.folder(layout, u) for u in source.units(config)
                           if (read.stage, u) in stage.needs(config, unit)]
                assert read.optional or any(matching_files(f, read.pattern) for f in folders), (stage.name, read)
    written = {p for p in tiny_run.root.rglob("*") if p.is_file()} - {layout.index}
    undeclared = sorted(str(p.relative_to(tiny_run.root)) for p in written - set(claimed))
    assert not undeclared, f"written but declared by no stage: {undeclared}"


def test_outputs_readme_shows_the_tree_the_table_declares() -> None:
    from emlab.stages import describe_layout

    readme = (REPO / "outputs" / "README.md").read_text()
    assert describe_layout() in readme, "regenerate outputs/README.md from emlab.stages.describe_layout()"
