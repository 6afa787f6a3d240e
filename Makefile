# Two commands do everything on a fresh clone:
#   make demo   set up, then run the main job (physis quickstart)
#   make test   set up, then run the test suite
# Set-up is idempotent and fast once done (a stamp file tracks pyproject.toml).

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.physis-installed
TORCH  := torch==2.13.0
EXTRAS := dev,sim
export MUJOCO_GL ?= egl

.PHONY: setup system-libs demo test lint clean

setup: system-libs $(STAMP)

# Headless rendering needs EGL / OSMesa / GL. Install them when missing and we are root; else say how.
system-libs:
	@missing=""; for lib in libEGL.so.1 libOSMesa.so.8 libGL.so.1; do \
	  ldconfig -p 2>/dev/null | grep -q "$$lib" || missing="$$missing $$lib"; done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = "0" ] && command -v apt-get >/dev/null; then \
	    echo "installing system libraries for headless rendering:$$missing"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libegl1 libosmesa6 libgl1 >/dev/null; \
	  else \
	    echo "missing system libraries:$$missing"; \
	    echo "install them with: sudo apt-get install -y libegl1 libosmesa6 libgl1"; exit 1; \
	  fi; \
	fi

# torch goes in first so that no dependency range pulls a CUDA build.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e ".[$(EXTRAS)]"
	$(PY) -m pip install -q --no-deps "openpi-client>=0.1"
	touch $(STAMP)

demo: setup
	$(VENV)/bin/physis quickstart

test: setup
	$(PY) -m pytest tests

lint: setup
	$(VENV)/bin/ruff check src tests
	$(VENV)/bin/ruff format --check src tests

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info
