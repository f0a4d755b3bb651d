# The two entry points of the README: `make run` and `make test`.
# Both install what they need first: Debian packages, the virtual environment, pip packages.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
APT_PACKAGES := dcmtk dicom3tools orthanc orthanc-dicomweb openssl postgresql chromium chromium-driver prometheus pixelmed-apps
SOURCES := airouter scp router inference encoders dispatch tests bench

.PHONY: all install system-deps run test lint typecheck unit clean

all: install

system-deps:
	@if ! command -v storescu >/dev/null || ! command -v dciodvfy >/dev/null \
	    || ! command -v Orthanc >/dev/null || ! command -v openssl >/dev/null \
	    || ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || [ ! -e /usr/share/orthanc/plugins/libOrthancDicomWeb.so ] \
	    || ! command -v chromedriver >/dev/null || ! command -v prometheus >/dev/null \
	    || ! command -v DicomSRValidator >/dev/null; then \
	  echo "installing Debian packages: $(APT_PACKAGES)"; \
	  $(SUDO) apt-get update && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y $(APT_PACKAGES); \
	fi

# torch first: `pip install torch==2.13.0` takes the CPU wheel on this machine's disk; anything
# that depends on torch installed before it would pull a multi-GB CUDA build.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[triton,dev]'
	touch $(STAMP)

# The dashboard's one script, htmx, from npm (pinned), served by the node itself: the pages
# work offline in a hospital network. Not committed: installed here, like the pip packages.
HTMX_VERSION := 2.0.11
HTMX := airouter/app/web/static/vendor/htmx.min.js
$(HTMX):
	rm -rf .npm-vendor && mkdir -p .npm-vendor $(dir $(HTMX))
	cd .npm-vendor && npm install --no-save --no-audit --no-fund --silent htmx.org@$(HTMX_VERSION)
	cp .npm-vendor/node_modules/htmx.org/dist/htmx.min.js $(HTMX)
	rm -rf .npm-vendor

# The viewer: OHIF's prebuilt app from npm (pinned), rewritten to live under /viewer/ by
# airouter.app.web.viewer (its OHIF_VERSION must match). Not committed; about 200 MB unpacked.
OHIF_VERSION := 3.13.2
OHIF := airouter/app/web/static/vendor/ohif/.installed-$(OHIF_VERSION)
$(OHIF): | $(STAMP)
	rm -rf .npm-ohif && mkdir -p .npm-ohif
	cd .npm-ohif && npm pack --silent @ohif/app@$(OHIF_VERSION) >/dev/null
	$(PY) -m airouter.app.web.viewer install .npm-ohif/ohif-app-$(OHIF_VERSION).tgz
	rm -rf .npm-ohif

install: system-deps $(STAMP) $(HTMX) $(OHIF)

run: install
	$(VENV)/bin/airouter serve

lint: install
	$(VENV)/bin/ruff check $(SOURCES)
	$(VENV)/bin/ruff format --check $(SOURCES)
	$(VENV)/bin/hadolint docker/Dockerfile docker/triton/Dockerfile
	$(VENV)/bin/lint-imports --no-cache

typecheck: install
	$(VENV)/bin/mypy

test: install lint typecheck
	$(VENV)/bin/pytest -v

unit: install
	$(VENV)/bin/pytest -v -m "not integration"

clean:
	rm -rf $(VENV) var
