"""The converted-model cache is shared by every run on a machine (and by the tests' workers):
runs that make the same converted copy at the same time all end with it, whole."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from emlab.config.experiment import ModelSpec
from emlab.models.load import converted_folder, load_model

REPO = Path(__file__).resolve().parents[1]
CUT = ModelSpec(name="smol-2l", source="embedded:smollm2-135m-instruct", num_layers=2)
LOAD = ("from emlab.config.experiment import ModelSpec\nfrom emlab.models.load import load_model\n"
        "m, _ = load_model(ModelSpec(name='smol-2l', source='embedded:smollm2-135m-instruct', num_layers=2))\n"
        "print(sum(p.numel() for p in m.parameters()))\n")


@pytest.mark.slow
def test_runs_converting_the_same_model_at_once_all_get_it(tmp_path: Path, isolated_cache: Path) -> None:
    load_model(CUT.model_copy(update={"num_layers": None}))  # the full copy, in the shared cache (once)
    full = converted_folder(CUT.model_copy(update={"num_layers": None}))
    assert full is not None
    cache = tmp_path / "cache"
    (cache / "models").mkdir(parents=True)
    (cache / "models" / full.name).symlink_to(full, target_is_directory=True)  # the cut is made anew here
    env = {**os.environ, "EMLAB_CACHE": str(cache), "EMLAB_ROOT": str(REPO)}
    runs = [subprocess.Popen([sys.executable, "-c", LOAD], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True) for _ in range(3)]
    results = [run.communicate(timeout=600) for run in runs]
    assert [run.returncode for run in runs] == [0, 0, 0], [err[-2000:] for _, err in results]
    assert len({out.strip() for out, _ in results}) == 1
    assert sorted(p.name for p in (cache / "models").iterdir()) == sorted([full.name, f"{full.name}-L2"])  # no .tmp left
