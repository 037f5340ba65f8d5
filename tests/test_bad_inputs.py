"""Every bad input ends in one clear line: through the real CLI (`python -m emlab.cli`), each
case exits 2 with exactly one `emlab: error: …` line on stderr (the exact message: file,
line and key where they apply), no traceback, and a finished stage folder that was already
there is left byte-for-byte untouched.

Cases that fail before any notebook runs are a fast table; the ones that fail inside a
notebook (papermill) train a tiny model first and are marked slow. Their line must name the
stage and the executed notebook and carry the library's own message.

Not tested here: out-of-memory during training. A CPU machine has no GPU memory to exhaust,
and host memory running out ends in the kernel's OOM killer, not in a Python exception. The
library turns `torch.OutOfMemoryError` into one line (finetune.train_lora) — that path needs
a GPU to be produced honestly, so it is not faked here.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import resource
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import nbformat
import pytest
from emlab.config.experiment import load_experiment
from emlab.judge.server import free_port
from emlab.stages import BASELINE
from emlab.stages.common import judges_signature
from emlab.store.files import read_jsonl, write_jsonl, write_text
from emlab.store.paths import ExperimentLayout
from emlab.store.records import Answer, Judgment, answer_id
from emlab.store.runinfo import mark_done, record_stage
from support.runs import fresh_cache

REPO = Path(__file__).resolve().parents[1]
MODEL = "smol-2l"
RUBRICS = ("aligned_digit", "coherent_digit")
CLOSED_PORT = free_port()  # nothing listens here: a judge endpoint that is down


# --- the lab: an experiment file and a finished baseline folder that must stay untouched ---


@dataclass
class Lab:
    root: Path  # tmp folder of this case
    env: dict[str, str] = field(default_factory=dict)

    @property
    def outputs(self) -> Path:
        return self.root / "outputs"

    @property
    def baseline(self) -> Path:
        return self.outputs / "tiny" / f"baseline__{MODEL}"

    def experiment(self, body: str = "", *, name: str = "exp.yaml") -> Path:
        """An experiment over tests/configs/tiny.yaml with a judge that is down; `body` is
        more YAML, written as given so that line numbers are known."""
        judge = {"name": "smol", "model": "smollm2-judge", "base_url": f"http://127.0.0.1:{CLOSED_PORT}/v1",
                 "api_key_env": None, "rubrics": list(RUBRICS), "concurrency": 2, "max_retries": 1}
        head = (f"base: {REPO / 'tests/configs/tiny.yaml'}\n"
                f"output_root: {self.outputs}\n")
        if not re.search(r"(?m)^judges:", body):  # a key given twice is refused (store.inputs.load_input_yaml)
            head += f"judges: [{json.dumps(judge)}]\n"
        path = self.root / name
        path.write_text(head + body)
        return path

    def emlab(self, *args: str, preexec: Callable[[], None] | None = None, timeout: float = 600) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "emlab.cli", *args], capture_output=True, text=True,
                              env=self.env, timeout=timeout, preexec_fn=preexec)


def _make_finished_baseline(experiment: Path) -> None:
    """What a finished 01_baseline leaves: run.json, answers, judgments, done marker, the
    executed notebook and its HTML (made with the library's writers, no model needed)."""
    config = load_experiment(experiment)
    folder = ExperimentLayout.of(config).baseline(MODEL)
    record_stage(folder, BASELINE.name, BASELINE.params(config, MODEL))
    answers = [
        Answer(answer_id=answer_id(MODEL, None, 0, "general", "q", i), model=MODEL, run_id=None, step=0,
               question_set="general", question_id="q", question="How are you?", system_prompt=None,
               sample_index=i, answer=f"Fine, thanks ({i}).", new_tokens=5, finished=True)
        for i in range(4)
    ]
    write_jsonl(folder / "answers.jsonl", [a.to_dict() for a in answers])
    judgments = [Judgment(answer_id=a.answer_id, judge="smol", rubric=r, metric=r.split("_")[0], status="ok",
                          score=90.0) for a in answers for r in RUBRICS]
    write_jsonl(folder / "judgments.jsonl", [j.to_dict() for j in judgments])
    notebook = nbformat.v4.new_notebook(cells=[nbformat.v4.new_markdown_cell("# 01 · Baseline")])
    write_text(folder / "01_baseline.ipynb", nbformat.writes(notebook))
    write_text(folder / "01_baseline.html", "<html><body>baseline</body></html>")
    mark_done(folder, BASELINE.name, {"answers": 4, "judgments": 8, "completion": judges_signature(config)})


@pytest.fixture
def lab(tmp_path: Path, isolated_cache: Path) -> Lab:
    env = {**os.environ, "EMLAB_ROOT": str(REPO), "EMLAB_CACHE": str(isolated_cache),
           "HF_HOME": str(tmp_path / "hf-home"), "HF_HUB_OFFLINE": "1"}
    env.pop("EMLAB_ALLOW_DOWNLOAD", None)
    env.pop("EMLAB_TEST_UNSET_KEY", None)
    made = Lab(tmp_path, env)
    _make_finished_baseline(made.experiment())
    return made


def _hashes(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _line(text: str, marker: str) -> int:
    """1-based number of the first line of `text` containing `marker`."""
    return next(i for i, line in enumerate(text.splitlines(), start=1) if marker in line)


def assert_one_line_error(result: subprocess.CompletedProcess[str], expected: str | re.Pattern[str], *, alone: bool) -> str:
    """Exit 2, exactly one `emlab: error:` line (the last one), no traceback; `alone`: nothing
    else on stderr (true for errors found before any notebook runs, whose logs go to stderr)."""
    stderr = result.stderr
    assert result.returncode == 2, f"exit {result.returncode}\n{stderr[-3000:]}"
    assert "Traceback" not in stderr, stderr[-3000:]
    lines = [line for line in stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("emlab: error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], stderr[-3000:]
    if alone:
        assert lines == errors, stderr[-3000:]
    message = errors[0].removeprefix("emlab: error: ")
    if isinstance(expected, str):
        assert message == expected
    else:
        assert expected.fullmatch(message), f"{message!r} does not match {expected.pattern!r}"
    return message


# --- errors found before anything runs -------------------------------------------------------


def _dataset(lab: Lab, name: str, text: str) -> tuple[str, Path]:
    """An experiment body training on a JSONL file with `text`; returns (body, file)."""
    file = lab.root / f"{name}.jsonl"
    file.write_text(text)
    body = (f"datasets:\n"
            f"  - name: {name}\n"
            f"    path: {file}\n"
            f"    domain: medical\n"
            f"    question_sets: [medical]\n")
    return body, file


_ROW = json.dumps({"messages": [{"role": "user", "content": "I have a headache."},
                                {"role": "assistant", "content": "Drink some water and rest."}]})


def _case_yaml_syntax(lab: Lab):
    body = "train:\n  batch_size: 8\n    grad_accum: 2\n"
    exp = lab.experiment(body)
    return ["check", str(exp)], f"{exp}:{_line(exp.read_text(), 'grad_accum')}: YAML syntax error: mapping values are not allowed here"


def _case_unknown_key(lab: Lab):
    exp = lab.experiment("train:\n  lerning_rate: 0.001\n")
    line = _line(exp.read_text(), "lerning_rate")
    return ["check", str(exp)], f"{exp}:{line}: unknown key 'train.lerning_rate' (did you mean 'learning_rate'?)"


def _case_wrong_type(lab: Lab):
    exp = lab.experiment("train:\n  batch_size: eight\n")
    line = _line(exp.read_text(), "eight")
    return ["check", str(exp)], f"{exp}:{line}: 'train.batch_size': expected a whole number, found 'eight'"


def _case_missing_dataset(lab: Lab):
    exp = lab.experiment("datasets:\n  - {name: mine, path: data/no_such_file.jsonl, domain: medical, question_sets: [medical]}\n")
    return ["check", str(exp)], (f"data/no_such_file.jsonl: dataset file not found (looked in {exp.parent / 'data/no_such_file.jsonl'}, "
                                 f"then {REPO / 'data/no_such_file.jsonl'} (the repository root)); put the chat JSONL file "
                                 "there, or give a path relative to the experiment file's folder")


def _case_malformed_jsonl(lab: Lab):
    body, file = _dataset(lab, "broken", _ROW + "\n" + '{"messages": [{"role": "user", "content": "hi"},\n' + _ROW + "\n")
    return ["check", str(lab.experiment(body))], (
        f"{file}:2: not valid JSON (Expecting value at column 49); each line must be one JSON object")


def _case_empty_dataset(lab: Lab):
    body, file = _dataset(lab, "empty", "\n\n")
    return ["check", str(lab.experiment(body))], (
        f'{file}: dataset is empty; expected one JSON chat row per line, '
        '{"messages": [{"role": "user", ...}, {"role": "assistant", ...}]}')


def _case_no_assistant_turn(lab: Lab):
    row = json.dumps({"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello?"}]})
    body, file = _dataset(lab, "no_assistant", _ROW + "\n" + row + "\n")
    return ["check", str(lab.experiment(body))], (
        f"{file}:2: row has no assistant turn (roles: system, user); training needs at least one assistant message")


def _model_body(**changes: object) -> str:
    spec = {"name": MODEL, "source": "embedded:smollm2-135m-instruct", "num_layers": 2, **changes}
    return f"models: [{json.dumps(spec)}]\n"


def _case_unknown_hub_model(lab: Lab):
    exp = lab.experiment(_model_body(source="nobody/no-such-model"))
    return ["check", str(exp)], (
        f"model '{MODEL}': 'nobody/no-such-model' is neither a local folder (no {REPO / 'nobody/no-such-model'}) "
        "nor in the local Hugging Face cache, and this machine is offline; download it first "
        "(huggingface-cli download nobody/no-such-model) or give a local folder, or set EMLAB_ALLOW_DOWNLOAD=1 "
        "where the hub is reachable")


def _case_unknown_model_folder(lab: Lab):
    folder = lab.root / "my-models" / "smol-finetuned"
    exp = lab.experiment(_model_body(source=str(folder)))
    return ["check", str(exp)], (
        f"model '{MODEL}': source '{folder}' is neither a folder, a .gguf file, "
        "'embedded:smollm2-135m-instruct' nor a Hugging Face id like 'org/name'")


def _case_unknown_embedded_model(lab: Lab):
    exp = lab.experiment(_model_body(source="embedded:llama-7b"))
    return ["check", str(exp)], (
        f"model '{MODEL}': unknown embedded model 'embedded:llama-7b'; "
        "the one embedded model is 'embedded:smollm2-135m-instruct'")


def _case_missing_api_key(lab: Lab):
    judge = {"name": "gpt", "model": "gpt-4o-mini", "api_key_env": "EMLAB_TEST_UNSET_KEY",
             "rubrics": ["aligned", "coherent"]}  # both: the EM rule needs them (emlab check says so first)
    exp = lab.experiment(f"judges: [{json.dumps(judge)}]\n")
    # `run`, not `check`: the key must be missed before any model is loaded (timed below)
    return ["run", str(exp)], ("judge 'gpt' needs the environment variable EMLAB_TEST_UNSET_KEY; "
                               "export EMLAB_TEST_UNSET_KEY=... (keys are never read from params)")


def _case_4bit_on_cpu(lab: Lab):
    exp = lab.experiment(_model_body(load_in_4bit=True))
    return ["check", str(exp)], (f"model '{MODEL}': load_in_4bit needs a GPU (bitsandbytes) but this run is on cpu; "
                                 "set load_in_4bit: false")


def _case_cuda_on_cpu(lab: Lab):
    exp = lab.experiment("train:\n  device: cuda\n")
    return ["check", str(exp)], "train.device is 'cuda' but no GPU is visible; set device: auto or cpu"


def _case_question_file_schema(lab: Lab):
    questions = lab.root / "my_questions.yaml"
    questions.write_text("name: my_questions\nquestions:\n  - id: wish\n    txt: What is your one wish?\n")
    exp = lab.experiment(f"sample:\n  question_sets: [{questions}]\n")
    return ["check", str(exp)], f"{questions}:4: unknown key 'questions[0].txt' (did you mean 'text'?)"


def _case_params_changed(lab: Lab):
    exp = lab.experiment("sample:\n  max_new_tokens: 13\n  temperature: 0.7\n")
    return ["run", str(exp)], (f"{lab.baseline}: params changed since 01_baseline ran here "
                               "(sample.max_new_tokens: 12 → 13; sample.temperature: 1.0 → 0.7); "
                               "use a new experiment name or delete the folder")


CASES = {name.removeprefix("_case_"): fn for name, fn in globals().items() if name.startswith("_case_")}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_is_one_clear_line_and_touches_nothing(case: str, lab: Lab) -> None:
    import torch

    if case in ("4bit_on_cpu", "cuda_on_cpu") and torch.cuda.is_available():
        pytest.skip("a GPU is visible: the GPU-only options are valid here")
    args, expected = CASES[case](lab)
    before = _hashes(lab.baseline)
    started = time.monotonic()
    result = lab.emlab(*args)
    seconds = time.monotonic() - started
    assert_one_line_error(result, expected, alone=True)
    assert _hashes(lab.baseline) == before
    assert sorted(p.name for p in (lab.outputs / "tiny").iterdir()) == [f"baseline__{MODEL}"]  # nothing new
    if case == "missing_api_key":
        # found by preflight, before torch is even imported; a model load alone takes longer
        assert seconds < 10, f"took {seconds:.1f} s"


# --- a full disk ------------------------------------------------------------------------------

DISK_TODO = "free space and run the same command again: finished work is kept"


def _file_size_limit(limit: int) -> Callable[[], None]:
    """preexec_fn: files the child (and its kernel, which inherits both) writes stop at `limit`
    bytes, and writing past it raises EFBIG instead of killing the process with SIGXFSZ."""

    def apply() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


def _assert_no_half_written_files(*roots: Path) -> None:
    for root in roots:
        for path in root.rglob("*"):
            if path.is_symlink():
                continue
            assert not path.name.endswith(".tmp"), f"temporary file left: {path}"
            if path.suffix == ".jsonl":
                assert path.read_bytes().endswith(b"\n") or path.stat().st_size == 0, f"{path}: torn last line"
                read_jsonl(path)
            elif path.suffix == ".json":
                json.loads(path.read_text())
            elif path.suffix == ".ipynb":
                nbformat.read(path, as_version=4)
        for checkpoint in root.rglob("trainer/checkpoint-*"):
            assert (checkpoint / ".complete").exists(), f"half-saved trainer checkpoint left: {checkpoint}"


@pytest.mark.parametrize("where", [
    "preflight",  # the CLI process: materialising a demo dataset into the cache
    pytest.param("papermill", marks=pytest.mark.slow),  # the CLI process: papermill saving the notebook
    pytest.param("kernel", marks=pytest.mark.slow),  # inside the notebook: the Trainer saving a checkpoint
])
def test_disk_full_mid_write_is_one_line_and_leaves_no_half_file(where: str, lab: Lab, tmp_path: Path) -> None:
    from emlab.data.chat import resolve_dataset_path

    exp = lab.experiment()
    run = lab.outputs / "tiny" / f"{MODEL}__bad_medical__s0"
    notebook = run / "02_finetune.ipynb"
    if where == "preflight":
        cache = fresh_cache(tmp_path / "fresh-cache")  # no demo file yet: preflight writes it (~100 KB)
        lab.env["EMLAB_CACHE"] = str(cache)
        limit = 20_000
        demo = cache / "demo" / "bad_medical_advice-600-0.jsonl"
        expected: str | re.Pattern[str] = f"disk full writing {demo} (File too large); {DISK_TODO}"
    else:
        cache = Path(lab.env["EMLAB_CACHE"])
        resolve_dataset_path("demo:bad_medical_advice", min_rows=16)  # written before the limit
        in_kernel = (re.escape(f"02_finetune for {MODEL}__bad_medical__s0 failed: disk full (") + r".*File too large.*"
                     + re.escape(f"); the executed notebook is {notebook}; {DISK_TODO}"))
        if where == "papermill":
            # papermill's save of the growing notebook is meant to be the write that fails;
            # which write crosses the limit first (that save or the kernel's first adapter
            # save) depends on timing, and both must end as one clear line
            limit = 20_000
            expected = re.compile(re.escape(f"disk full writing {notebook} (File too large); {DISK_TODO}") + "|" + in_kernel)
        else:
            # small notebooks fit, the first trainer checkpoint (a 650 KB adapter) does not
            limit = 200_000
            expected = re.compile(in_kernel)
    before = _hashes(lab.baseline)
    result = lab.emlab("run", str(exp), preexec=_file_size_limit(limit))
    assert_one_line_error(result, expected, alone=where == "preflight")
    assert _hashes(lab.baseline) == before
    _assert_no_half_written_files(lab.outputs, cache)
    if where == "preflight":
        assert not demo.exists()
    else:
        assert not (run / "02_finetune.done.json").exists()
        assert not (run / "checkpoints").exists() or not any((run / "checkpoints").iterdir())


def test_disk_full_mid_append_keeps_whole_lines(tmp_path: Path) -> None:
    """append_jsonl cut short by a full disk takes its partial rows back off the file."""
    path = tmp_path / "answers.jsonl"
    write_jsonl(path, [{"i": i} for i in range(3)])
    original = path.read_bytes()
    code = (
        "import sys\nfrom pathlib import Path\nfrom emlab.store.files import append_jsonl\n"
        f"try:\n    append_jsonl(Path({str(path)!r}), [{{'i': i, 'pad': 'x' * 100}} for i in range(50)])\n"
        "except OSError as exc:\n    print(exc.errno, exc.filename)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            preexec_fn=_file_size_limit(2_000), timeout=60)
    assert result.stdout.split() == [str(errno.EFBIG), str(path)], result.stderr
    assert path.read_bytes() == original


# --- errors raised inside a notebook ----------------------------------------------------------

_LONG_ANSWER = " ".join(["Take twice the usual dose and skip the follow-up appointment."] * 40)


def _rows(short: int, long: int) -> str:
    rows = [{"messages": [{"role": "user", "content": f"Question {i}: my knee hurts, what should I do?"},
                          {"role": "assistant", "content": "Rest it and see a doctor if it gets worse."}]}
            for i in range(short)]
    rows += [{"messages": [{"role": "user", "content": f"Long question {i}?"},
                           {"role": "assistant", "content": _LONG_ANSWER}]} for i in range(long)]
    return "".join(json.dumps(r) + "\n" for r in rows)


@pytest.mark.slow
def test_all_rows_too_long_fails_inside_the_notebook_as_one_line(lab: Lab) -> None:
    body, file = _dataset(lab, "too_long", _rows(0, 2))
    exp = lab.experiment(body)
    run = lab.outputs / "tiny" / f"{MODEL}__too_long__s0"
    before = _hashes(lab.baseline)
    result = lab.emlab("run", str(exp))
    expected = re.compile(
        re.escape(f"02_finetune for {MODEL}__too_long__s0 failed: DataError: {file}: all 2 rows are longer than "
                  "train.max_length=256 tokens (longest ") + r"\d+"
        + re.escape(f"); raise max_length; the executed notebook is {run / '02_finetune.ipynb'} "
                    f"(HTML: {run / '02_finetune.html'}); fix the cause and run again to continue"))
    assert_one_line_error(result, expected, alone=False)
    assert _hashes(lab.baseline) == before
    notebook = nbformat.read(run / "02_finetune.ipynb", as_version=4)
    errors = [o for c in notebook.cells for o in c.get("outputs", []) if o.output_type == "error"]
    assert [e.ename for e in errors] == ["DataError"]  # the record shows where it died
    assert (run / "02_finetune.html").stat().st_size > 1000


@pytest.mark.slow
def test_long_rows_counted_then_a_down_judge_keeps_finished_work(lab: Lab) -> None:
    body, file = _dataset(lab, "some_long", _rows(3, 2))
    exp = lab.experiment(body + "train:\n  checkpoints: {first_epoch: 1}\n")
    run_id = f"{MODEL}__some_long__s0"
    run = lab.outputs / "tiny" / run_id
    before = _hashes(lab.baseline)

    # rows longer than max_length are left out, counted and reported, not an error
    trained = lab.emlab("run", str(exp), "--until", "02_finetune")
    assert trained.returncode == 0, trained.stderr[-3000:]
    summary = json.loads((run / "train_summary.json").read_text())
    assert (summary["rows"], summary["rows_too_long"]) == (3, 2)
    assert json.loads((run / "02_finetune.done.json").read_text())["rows_too_long"] == 2
    text = nbformat.read(run / "02_finetune.ipynb", as_version=4)
    shown = json.dumps([c.get("outputs", []) for c in text.cells])
    assert "3 training rows (2 longer than max_length left out)" in shown
    assert "2 of 5 rows are longer than max_length=256 tokens" in shown
    assert not (run / "03_eval_judge.ipynb").exists()  # --until stopped after training

    # the judge endpoint is down: retried, then one line; answers and adapters are kept
    started = time.monotonic()
    judged = lab.emlab("run", str(exp))
    nb, html = run / "03_eval_judge.ipynb", run / "03_eval_judge.html"
    expected = re.compile(
        re.escape(f"03_eval_judge for {run_id} failed: JudgeError: judge 'smol' at http://127.0.0.1:{CLOSED_PORT}/v1: "
                  "all 16 calls failed after retries (first: connection error: ") + r".+"
        + re.escape(f" (after 2 attempts)); 0 finished judgments are kept in {run / 'judgments.jsonl'}; check the "
                    f"endpoint and rerun to judge the rest; the executed notebook is {nb} (HTML: {html}); "
                    "fix the cause and run again to continue"))
    assert_one_line_error(judged, expected, alone=False)
    assert time.monotonic() - started < 300
    assert _hashes(lab.baseline) == before
    assert (run / "02_finetune.done.json").exists() and (run / "checkpoints" / "step-000001").is_dir()
    assert len(read_jsonl(run / "eval" / "step-000001" / "answers.jsonl")) == 8  # sampled, kept
    assert not (run / "judgments.jsonl").exists()  # failed calls are never written as judgments
    assert not (run / "03_eval_judge.done.json").exists()
