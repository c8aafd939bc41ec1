# taming-pipeline: `make demo` runs the pipeline end to end, `make test` runs the tests.
# Every target installs what it needs into .venv/ first (a no-op when up to date).
SHELL := /bin/bash
.SHELLFLAGS := -eo pipefail -c
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
# pip prints one warning per package missing from this machine's extra local indexes: hide them
QUIET_PIP := grep -v "is ignored: it is neither a file nor a directory" || true
export RAY_AUTH_MODE ?= disabled
export RAY_USAGE_STATS_ENABLED ?= 0
export PYTHONUNBUFFERED := 1

.PHONY: install demo test test-fast bench lint format up down submit data tokenize sample export clean help
IMAGES ?= $(CURDIR)/.local/runs/demo/images
TOKENIZER ?= models:/demo-vqgan@candidate
OUT ?= $(CURDIR)/.local/runs/demo/codes

help:
	@echo "make demo     run the whole pipeline on Fashion-MNIST with embedded defaults"
	@echo "make test     run the test suite (starts its own Ray, MLflow server and S3 server)"
	@echo "make test-fast  the tests that need no Ray, MLflow or S3 server (about a minute; the edit-test loop)"
	@echo "make bench    run the benchmarks in tests/bench/ (slow; prints ratios vs references)"
	@echo "make lint     ruff check + format check"
	@echo "make up/down  start/stop a local Ray head, MLflow server and S3 server (state in .local/)"
	@echo "make submit   submit the demo pipeline as a Ray job to the 'make up' cluster"
	@echo "make tokenize tokenize IMAGES with TOKENIZER into OUT (defaults: the demo's images and models:/demo-vqgan@candidate)"
	@echo "make sample   N samples from the generator MODEL into OUT (defaults: models:/demo-gpt@candidate, 1000,"
	@echo "              .local/runs/demo/samples-N); ARGS='sampler.cfg_scale=2 sampler.top_k=100 ...' for more keys"
	@echo "make export   committed images SRC as PNG files in class folders at DEST (defaults: the demo's samples,"
	@echo "              .local/export/samples); FORMAT=webdataset for tar shards"

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	@test -x $(BIN)/python || $(PY) -m venv $(VENV)
	@echo "installing into $(VENV) (torch/torchvision pinned by constraints.txt) ..."
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[test]' 2>&1 | $(QUIET_PIP)
	@$(BIN)/python -c "import torch, torchvision, ray, mlflow, s3fs, pyarrow, timm, lpips"
	@touch $(STAMP)

data: install
	$(BIN)/python -m infra.sources fashion-mnist

# ends with the summary table and where to look (MLflow UI command, sample grid, metrics, logs)
demo: install data
	$(BIN)/python pipelines/full.py --config pipelines/configs/demo.yaml $(ARGS)

test: install
	$(BIN)/python -m pytest tests $(PYTEST_ARGS)

test-fast: install
	$(BIN)/python -m pytest tests -m "not services and not slow" -q $(PYTEST_ARGS)

bench: install data
	$(BIN)/python -m tests.bench $(BENCH_ARGS)

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: install
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

up: install
	$(BIN)/python -m infra.services up --root .local

down:
	@if [ -x $(BIN)/python ]; then $(BIN)/python -m infra.services down --root .local; fi

submit: install data
	source .local/env.sh && $(BIN)/ray job submit --working-dir . -- \
	  python pipelines/full.py --config pipelines/configs/demo.yaml run.root_uri=$(CURDIR)/.local/runs/demo-job $(ARGS)

tokenize: install
	$(BIN)/python -m stages.tokenize_images --config pipelines/configs/demo.yaml \
	  tokenize_images.images_uri=$(IMAGES) tokenize_images.tokenizer_uri=$(TOKENIZER) \
	  tokenize_images.output_uri=$(OUT) $(ARGS)

# N samples spread over the classes (a class-conditional MODEL) or N unconditional ones; a spatially
# conditioned MODEL needs ARGS='conditions_uri=...'. The demo config's sampler settings apply.
MODEL ?= models:/demo-gpt@candidate
N ?= 1000
sample: install
	$(BIN)/python -m stages.sample --config pipelines/configs/demo.yaml \
	  sample.model_uri=$(MODEL) sample.samples_per_class=null sample.num_samples=$(N) \
	  sample.output_uri=$(if $(filter command line,$(origin OUT)),$(OUT),$(CURDIR)/.local/runs/demo/samples-$(N)) $(ARGS)

# any committed image output (ingest, sample, a condition stage), local or s3://, as files
SRC ?= $(CURDIR)/.local/runs/demo/samples
DEST ?= $(CURDIR)/.local/export/$(notdir $(SRC))
FORMAT ?= imagefolder
export: install
	$(BIN)/python -m pipelines.export $(SRC) $(DEST) --format $(FORMAT) $(ARGS)

clean:
	rm -rf .local/runs .local/mlflow.db .local/mlartifacts .local/export
