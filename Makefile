# Two commands for a newcomer: `make demo` and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
# faiss-gpu where nvidia-smi sees a GPU, faiss-cpu otherwise.
FAISS  := $(shell nvidia-smi -L >/dev/null 2>&1 && echo gpu || echo cpu)
STAMP  := $(VENV)/.installed-$(FAISS)
DEMO   := runs/demo

.PHONY: install test lint demo clean

install: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade-strategy only-if-needed -e '.[dev,$(FAISS)]'
	@touch $@

# CI (.ci/run) calls this target: the same lint as `make lint`, then the tests, one file per worker
# on 2 workers (most tests run one thread or subprocesses, so 2 cores finish in about half the time).
test: lint
	$(PY) -m pytest -n 2 --dist loadfile

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

# The whole pipeline on scikit-learn's digits: pretrain -> evaluate -> fine-tune (each: SSL vs random init)
# -> test-time adaptation on a regenerated corruption (source vs Tent; the ViT and a BatchNorm CNN trained
# from scratch, the papers' case) -> INT8 deployment (fp32 vs INT8).
demo: $(STAMP)
	$(VENV)/bin/pretrain --config configs/pretrain/digits_cpu.yaml out=$(DEMO)/pretrain resume=auto
	$(VENV)/bin/probe --checkpoint $(DEMO)/pretrain/backbone.safetensors --compare-random-init \
		--dataset digits --out $(DEMO)/probe
	$(VENV)/bin/finetune --config configs/finetune/digits_cpu.yaml \
		--checkpoint $(DEMO)/pretrain/backbone.safetensors --out $(DEMO)/finetune
	$(VENV)/bin/finetune --config configs/finetune/digits_cpu.yaml --random-init \
		--checkpoint $(DEMO)/pretrain/backbone.safetensors --out $(DEMO)/finetune_random_init
	$(PY) -m selfsup.tta.generate --dataset digits --split val --corruptions frost contrast --severities 3 \
		--out $(DEMO)/digits-c
	$(VENV)/bin/tta --checkpoint $(DEMO)/finetune/best.safetensors --dataset $(DEMO)/digits-c \
		--corruptions frost,contrast --severity 3 --method source,tent --batch-size 16 lr=0.02 --out $(DEMO)/tta
	$(VENV)/bin/finetune --config configs/finetune/digits_resnet_cpu.yaml --out $(DEMO)/finetune_cnn
	$(VENV)/bin/tta --checkpoint $(DEMO)/finetune_cnn/best.safetensors --dataset $(DEMO)/digits-c \
		--corruptions frost,contrast --severity 3 --method source,norm,tent --batch-size 16 --out $(DEMO)/tta_cnn
	$(VENV)/bin/compress --checkpoint $(DEMO)/finetune/best.safetensors --dataset digits \
		--quantize int8-dynamic --out $(DEMO)/compress
	$(PY) benchmarks/demo_tables.py $(DEMO) --write
	@echo "demo done: the tables above are in $(DEMO)/RESULTS.md; open $(DEMO)/probe/report.html, $(DEMO)/finetune/report.html, $(DEMO)/tta/report.html and $(DEMO)/compress/report.html"

clean:
	rm -rf $(DEMO) .pytest_cache .ruff_cache
