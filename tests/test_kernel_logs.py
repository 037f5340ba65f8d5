"""A stage kernel's logs go to the stage's log file, not into the executed notebook: every
record and Python warning in the file, emlab's warnings also shown, each message once."""

from __future__ import annotations

import logging
import warnings

from emlab.config.experiment import load_experiment
from emlab.pipeline.kernel import route_logs, start_stage
from emlab.store.paths import by_hand_log_file
from support.runs import REPO


def test_logs_go_to_the_file_and_emlab_warnings_show_once(tmp_path, capsys, restore_logging) -> None:
    path = tmp_path / "01_baseline.log"
    route_logs(path, fresh=True)
    logging.getLogger("httpx").info('HTTP Request: POST http://127.0.0.1:1/v1/chat/completions "HTTP/1.1 200 OK"')
    logging.getLogger("httpx").warning("a library's warning")
    logging.getLogger("emlab.judge.api").info("judged 16 answers")
    for _ in range(3):
        logging.getLogger("emlab.analysis.metrics").warning("no baseline answers to compare with")
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.warn("IProgress not found", UserWarning, stacklevel=1)

    shown = capsys.readouterr().err
    assert shown.count("no baseline answers to compare with") == 1
    assert "HTTP Request" not in shown and "judged 16" not in shown
    assert "library's warning" not in shown and "IProgress" not in shown
    text = path.read_text()
    assert "HTTP Request: POST" in text and "judged 16 answers" in text and "IProgress not found" in text
    assert text.count("no baseline answers to compare with") == 3  # the file keeps every line

    route_logs(path, fresh=False)  # run by hand: appended to, never erased
    logging.getLogger("emlab").info("second session")
    assert "HTTP Request" in path.read_text() and "second session" in path.read_text()
    route_logs(path, fresh=True)  # emlab run: the log starts afresh, as its notebook does
    assert "HTTP Request" not in path.read_text()


def test_start_stage_routes_the_logs_and_links_the_file(tmp_path, capsys, restore_logging) -> None:
    config = load_experiment(REPO / "tests/configs/tiny.yaml").model_copy(update={"output_root": str(tmp_path)})
    header = start_stage(config, "01_baseline", "smol-2l")
    path = by_hand_log_file(tmp_path / "tiny" / "baseline__smol-2l", "01_baseline")  # not under emlab run
    assert f"`{path}`" in header and "**stage** `01_baseline`" in header  # run by hand: the full path
    logging.getLogger("httpx").info("HTTP Request: POST")
    assert "HTTP Request: POST" in path.read_text() and "run by hand" in path.read_text()
    assert "HTTP" not in capsys.readouterr().err
