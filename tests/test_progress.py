"""Progress shows where the user is looking: a kernel started by `emlab run` reports through
the progress file and the terminal keeps one line per stage, while the notebook stays clean."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

from emlab.progress import ENV, ProgressDisplay, format_state


class _Log(io.StringIO):
    def isatty(self) -> bool:
        return False


def test_state_reads_like_a_progress_bar() -> None:
    state = {"desc": "train", "n": 4, "total": 6, "unit": "steps", "elapsed": 12.0,
             "postfix": {"loss": 2.31, "tok/s": "1,234"}}
    assert format_state(state) == "train 4/6 steps  67% [00:12<00:06] loss 2.31, tok/s 1,234"
    assert format_state({"desc": "judge x", "n": 3, "total": None, "unit": "call", "elapsed": 75}) == \
        "judge x 3 call [01:15]"


def test_a_child_process_reports_through_the_file_and_the_log_keeps_its_end(tmp_path: Path) -> None:
    log = _Log()
    child = ("from emlab.progress import progress_bar\n"
             "with progress_bar(5, 'sampling step 2', 'answer') as bar:\n"
             "    for _ in range(5):\n"
             "        bar.set_postfix(batch=1)\n"
             "        bar.update(1)\n")
    with ProgressDisplay(tmp_path / "progress.jsonl", "03_eval_judge run", stream=log):
        assert os.environ[ENV] == str(tmp_path / "progress.jsonl")  # what the kernel inherits
        done = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""  # nothing drawn where the child's output goes (the notebook)
    assert ENV not in os.environ and not (tmp_path / "progress.jsonl").exists()
    last = log.getvalue().splitlines()[-1]
    assert last.startswith("03_eval_judge run · sampling step 2 5/5 answer 100% ["), last
    assert last.endswith("batch 1"), last
