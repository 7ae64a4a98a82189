# Set-up, tests and the main job. `make install` is idempotent and safe on a fresh machine:
# it installs the CPU build of torch first (pinned; an unpinned torch pulls a multi-GB CUDA
# build), then the project with its dev extras (.[dev] pulls every other extra but xformers).
PYTHON ?= python3
PIP ?= $(PYTHON) -m pip
TORCH_SPEC ?= torch==2.13.0
STAMP := .install.stamp

.PHONY: install test test-fast demo demo-quick clean

$(STAMP): pyproject.toml
	$(PIP) install --quiet "$(TORCH_SPEC)"
	$(PIP) install --quiet -e ".[dev]"
	$(PIP) install --quiet --no-deps "open_clip_torch>=2.24"  # only its BPE vocabulary file is read; its torchvision dependency would break CPU torch
	-command -v pyenv >/dev/null 2>&1 && pyenv rehash  # put new console scripts on PATH under pyenv
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PYTHON) -m pytest -q --timeout=1800

test-fast: $(STAMP)
	$(PYTHON) -m pytest -q -m "not slow" --timeout=600

demo: $(STAMP)
	t2i-recap demo --out runs/demo

demo-quick: $(STAMP)
	t2i-recap demo --out runs/demo-quick --quick

clean:
	rm -rf $(STAMP) build dist *.egg-info
