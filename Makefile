# The two commands a new user needs: `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: demo test install clean

$(PY):
	$(PYTHON) -m venv $(VENV)

# CPU builds for local use and CI: pinning torch first keeps pip from pulling
# a multi-GB CUDA build; tensorflow-cpu stands in for the `tf` extra. The ucx
# extra (ucxx, ~250 MB, runs without a GPU) lets the ucx:// tests run for real.
$(STAMP): $(PY) pyproject.toml Makefile
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "torch==2.13.0" "tensorflow-cpu>=2.16"
	$(PY) -m pip install -q -e ".[dev,plots,ucx]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m pipetrain train models/configs/demo.toml --overwrite

test: $(STAMP)
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) runs .pytest_cache
