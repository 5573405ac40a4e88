# The two commands: `make demo` and `make test`. Everything else is a step they share.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup gen demo test fuzz lint check-gen bench bench-atto bench-quality bench-scale bench-parallel bench-watchers bench-replicas bench-export bench-sets bench-analysis up clean

# The venv is rebuilt when the requirements change. torch/torchvision are pinned in
# requirements.txt (pip takes them from local disk here); pip never resolves an unpinned torch.
$(STAMP): requirements.txt requirements-dev.txt pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV) || python3 -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -r requirements-dev.txt
	$(BIN)/python scripts/gen_protos.py
	$(BIN)/pip install --quiet --no-deps -e .
	touch $(STAMP)

setup: $(STAMP)

gen/segtrain/__init__.py: $(STAMP) $(wildcard protos/segtrain/*/v1/*.proto)
	$(BIN)/python scripts/gen_protos.py

gen: gen/segtrain/__init__.py

demo: setup gen
	$(BIN)/python scripts/demo.py

# Property tests of the parsers and decoders with many more examples than `make test` runs.
fuzz: setup gen
	SEGTRAIN_FUZZ_EXAMPLES=$${SEGTRAIN_FUZZ_EXAMPLES:-20000} $(BIN)/python -m pytest -q -p no:cacheprovider tests/unit/fuzz

# The last released API: `buf breaking` refuses a change to the protos that would break its
# clients (a field renumbered or removed, a type changed...). Move it forward when releasing.
API_RELEASE := 50b01091e29857c3c6d4a7026e957081cf81fa25

test: setup gen
	$(BIN)/python scripts/gen_protos.py --check
	$(BIN)/buf lint
	$(BIN)/buf breaking --against '.git#ref=$(API_RELEASE)'
	$(BIN)/ruff check .
	$(BIN)/mypy segcore services clients scripts
	$(BIN)/lint-imports
	$(BIN)/python -m pytest -q

lint: setup
	$(BIN)/ruff check .
	$(BIN)/mypy segcore services clients scripts
	$(BIN)/lint-imports

bench: setup gen
	$(BIN)/python bench/run.py

# The same benchmarks on a 5.6 M-parameter model, at sizes a 2-core machine affords (~5.5 min).
bench-atto: setup gen
	$(BIN)/python bench/run.py --architecture upernet-convnextv2-atto --tiles 32 --epochs 4 --rounds 4 \
		--analysis-tiles 16 --repeats 5

# Peak memory (PSS of the node's process tree) and speed of a job at 250, 1,000 and 4,000 tiles of 512².
bench-scale: setup gen
	$(BIN)/python bench/scale.py

# Data-parallel training on this machine: 1 process, 2 processes on a node, 1 process on each of 2 nodes.
bench-parallel: setup gen
	$(BIN)/python bench/parallel.py

# Fan-out of one metrics process to 2,000, 5,000 and 10,000 live watchers (~4 min).
bench-watchers: setup gen
	$(BIN)/python bench/watchers.py

# Scheduling and relay rates with 1 and 2 pipeline/metrics replicas on PostgreSQL, side by side (~3 min).
bench-replicas: setup gen
	$(BIN)/python bench/replicas.py

# What exporting a model costs a node: seconds and peak memory per architecture and format (~5 min).
bench-export: setup gen
	$(BIN)/python bench/export.py

# What creating a training set costs the pipeline service at 1,000, 4,000 and 10,000 tiles of 512² (~15 min).
bench-sets: setup gen
	$(BIN)/python bench/sets.py

# Analysis jobs of 1,000, 4,000 and 10,000 tiles of 256² against the bare batched forward, and the node's memory.
bench-analysis: setup gen
	$(BIN)/python bench/analysis.py

# Foreground IoU of the product with its defaults vs a bare PyTorch loop on five imaging regimes.
bench-quality: setup gen
	$(BIN)/python bench/quality.py

up: setup gen
	$(BIN)/segtrain up

clean:
	rm -rf $(VENV) gen demo-output bench-output .segtrain
