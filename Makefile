# The README's two commands: `make run` (the whole pipeline on the embedded default) and `make test`.
# Each sets up what it needs first; setup is idempotent and takes seconds once done.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
SYSTEM_PACKAGES := pkg-config libturbojpeg0-dev libjpeg62-turbo-dev libopencv-dev libtcmalloc-minimal4
JPEGCROP := pipeline_src/loader/_jpegcrop.so
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
PROFILE ?= params.yaml

.PHONY: run test pull setup system-packages clean-runs

run: setup
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(VENV)/bin/snakemake --cores all --config params_file=$(PROFILE)

# One pytest worker per core (at most 4), a test file per worker at a time: a file's module fixtures
# (the end-to-end DAG: the longest, so conftest puts it first) are built once.
test: setup
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(PY) -m pytest -q -n auto --maxprocesses 4 --dist loadfile --no-loadscope-reorder tests

# Outputs from the DVC remote, then `snakemake --touch`: pulled files have new mtimes, which Snakemake
# would take for changed inputs; touching records them (and the current settings) as up to date.
# Run it only on a commit whose dvc.lock matches params (dvc status checks that first). The default
# profile's stages; for another, `dvc pull profiles/<name>/dvc.yaml` and the same touch with its params.
DEFAULT_STAGES := plan synthetic prepare train teacher distill transfer_detection transfer_segmentation report
pull: setup
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" dvc pull $(DEFAULT_STAGES)
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" dvc status -q $(DEFAULT_STAGES)
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(VENV)/bin/snakemake --cores 1 --touch

setup: system-packages $(STAMP) .dvc/config $(JPEGCROP)

# The loader's crop-region JPEG decoder (pipeline_src/loader/decoders.py falls back to a full decode
# without it), compiled against the system libjpeg-turbo's scanline API.
$(JPEGCROP): pipeline_src/loader/jpegcrop.c | system-packages
	$(CC) -O2 -shared -fPIC -Wall -Wextra -Werror -o $@.tmp $< -ljpeg && mv $@.tmp $@

# ffcv compiles against libturbojpeg and OpenCV, found through pkg-config; the crop decoder
# against libjpeg-turbo (libjpeg62-turbo-dev); training jobs preload tcmalloc (launch.allocator).
system-packages:
	@if ! dpkg -s $(SYSTEM_PACKAGES) >/dev/null 2>&1; then \
	  echo "installing system packages: $(SYSTEM_PACKAGES)"; \
	  $(SUDO) apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq --no-install-recommends $(SYSTEM_PACKAGES); \
	fi

$(STAMP): pyproject.toml
	@[ -x $(PY) ] || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -e '.[test]'
	$(PY) -m pip check
	@touch $@

.dvc/config: | $(STAMP)
	$(VENV)/bin/dvc init -q
