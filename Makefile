# mmv_tf — everything a fresh machine needs goes through these targets.
#   make demo        set up, then run the main job on the embedded synthetic data
#                    (FAMILY=vatt or FAMILY=brave: that family's tiny model; default mmv)
#   make test        set up, then run the test suite (what CI runs, with `make bazel-test`)
#   make bazel-test  run the py_test targets with Bazel, offline (Debian's bazel-bootstrap)
SHELL := /bin/bash
PY ?= python3
VENV := $(CURDIR)/.venv
PYTHON := $(VENV)/bin/python
INSTALL_STAMP := $(VENV)/.stamp-install
APT_STAMP := $(VENV)/.stamp-apt
# Debian packages: chromium renders report.html in tests; bazel-bootstrap(-source) runs `bazel test` offline.
APT_PACKAGES := chromium bazel-bootstrap bazel-bootstrap-source
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
PYTEST_ARGS ?=
FAMILY ?= mmv
# One family per work dir: demo_workdir for MMV (as always), demo_workdir_<family> for the others.
WORKDIR ?= $(CURDIR)/demo_workdir$(if $(filter-out mmv,$(FAMILY)),_$(FAMILY))
BAZEL_TAG_FILTERS ?= -slow

.PHONY: setup apt demo test test-slow bazel-test benchmarks clean

setup: $(INSTALL_STAMP)

# --no-compile: byte-compiling every installed module (TensorFlow's thousands) took ~45 s of CPU of a
# ~100 s warm-cache install; Python compiles what it imports on first use instead (no measurable cost).
$(INSTALL_STAMP): setup.py
	@test -x $(PYTHON) || $(PY) -m venv $(VENV)
	$(PYTHON) -m pip install --quiet --disable-pip-version-check --upgrade "pip>=24" wheel setuptools
	$(PYTHON) -m pip install --quiet --disable-pip-version-check --no-compile -e '.[test]'
	@touch $@

apt: $(APT_STAMP)

$(APT_STAMP):
	@missing=""; for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "apt-get install:$$missing"; \
	  $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	fi
	@mkdir -p $(VENV) && touch $@

demo: setup
	$(VENV)/bin/mmv-tf demo --family $(FAMILY) --workdir $(WORKDIR)

# Fast suite: everything except tests marked `slow` (those run with `make test-slow`).
test: setup apt
	$(PYTHON) -m pytest -q -n 2 --durations=15 $(PYTEST_ARGS) tests

test-slow: setup apt
	$(PYTHON) -m pytest -q -n 2 --run-slow --durations=15 $(PYTEST_ARGS) tests

BAZEL_FLAGS := --override_repository=remote_coverage_tools=$(CURDIR)/third_party/bazel/remote_coverage_tools \
	--incompatible_use_python_toolchains=false --python_path=$(PYTHON)
bazel-test: setup apt
	bazel test $(BAZEL_FLAGS) --test_tag_filters=$(BAZEL_TAG_FILTERS) --test_output=errors //...

benchmarks: setup
	for b in benchmarks/*.py; do $(PYTHON) $$b || exit 1; done

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache $(WORKDIR) $(CURDIR)/demo_workdir $(CURDIR)/demo_workdir_*
	-bazel clean --expunge 2>/dev/null
