PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: install browser orthanc postgres lint test test-fast test-slow docs models run clean

# The browser test drives Debian's chromium (Playwright never downloads a browser here).
CHROMIUM ?= /usr/bin/chromium
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

# torch is installed first and pinned so pip takes the CPU wheel already on disk. The editable
# install is redone only when pyproject.toml changes (a stamp file), so `make run` and
# `make test` start at once on an installed tree; `make install FORCE=1` reinstalls.
STAMP := $(VENV)/.medlens-installed
ifdef FORCE
.PHONY: $(STAMP)
endif
# Everything (every extra, the test and docs tools) at the versions of constraints.txt.
$(STAMP): pyproject.toml constraints.txt | $(BIN)/python
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -c constraints.txt -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

browser:
	@if [ ! -x $(CHROMIUM) ]; then \
		$(SUDO) apt-get update -qq && \
		$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; \
	fi

# The PACS round trip test starts Debian's Orthanc with its DICOMweb plugin (never a mock).
ORTHANC ?= /usr/sbin/Orthanc
orthanc:
	@if [ ! -x $(ORTHANC) ] || [ ! -e /usr/share/orthanc/plugins/libOrthancDicomWeb.so ]; then \
		$(SUDO) apt-get update -qq && \
		$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
			orthanc orthanc-dicomweb; \
	fi

# The prediction-record tests start Debian's PostgreSQL on a temporary folder and port.
postgres:
	@if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then \
		$(SUDO) apt-get update -qq && \
		$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
			postgresql; \
	fi

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

test: install browser orthanc postgres lint
	$(BIN)/python -m pytest -q

# The tests that need no outside process and no real model (under 2 minutes), and the others.
test-fast: install
	$(BIN)/python -m pytest -q -m "not slow"

test-slow: install
	$(BIN)/python -m pytest -q -m slow

# The documentation (docs/, pages listed in mkdocs.yml) as a website in site/; no network needed.
docs: install
	$(BIN)/mkdocs build --strict --site-dir site

# The six bundled models, retrained from ../shared/data with the recipes' exact settings,
# exported as inference-only folders into the package (64 MiB together), each then audited for
# shortcuts on the images it held out (the audit's figures go on its card).
DATA ?= ../shared/data
HOST ?= 127.0.0.1
PORT ?= 8000
# $(3): weight storage, --half (float16) or --int8 (8-bit, a scale per output channel);
# $(4): the split the audit reads (test: the carved test split; val: a fold ensemble's
# out-of-fold validation).
define bundle
	$(BIN)/medlens train --config recipes/$(1).yaml --data $(DATA)/$(2) --out runs/$(1) --overwrite --quiet
	$(BIN)/medlens export --model runs/$(1) --bundle medlens/bundled/$(1) $(3) --overwrite --card recipes/$(1).yaml
	$(BIN)/medlens audit --model medlens/bundled/$(1) --data $(DATA)/$(2) --split $(4) --record --quiet
endef

models: install
	@test -d $(DATA) || { echo "make models needs the training data in $(DATA) (DATA=...)"; exit 2; }
	$(call bundle,pneumonia,chest_xray/train,--int8,test)
	$(call bundle,brain-tumor,brain_mri/train,--half,test)
	$(call bundle,covid,covid_xray/train,--int8,val)
	$(call bundle,pharyngitis,pharyngitis,--int8,val)
	$(call bundle,tuberculosis,tb_xray/train,--half,test)
	$(call bundle,covid-ct,covid_ct/train,--half,test)

# The diagnosis web app with the bundled models.
run: install
	@echo "MedLens: starting the web app at http://$(HOST):$(PORT) (Ctrl+C stops it)"
	$(BIN)/medlens serve --host $(HOST) --port $(PORT)

clean:
	rm -rf build dist *.egg-info .pytest_cache
