# The two commands: `make demo` and `make test`. Each creates .venv when missing.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test lint typecheck proto proto-check clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

# FedAvg and LSS on the same data and pre-trained start, then one report comparing them.
demo: $(STAMP)
	T=$$(date +%Y%m%d-%H%M%S) && \
	$(VENV)/bin/lssfl run --config configs/demo.yaml --run-dir runs/demo-fedavg-$$T && \
	$(VENV)/bin/lssfl run --config configs/demo-lss.yaml --run-dir runs/demo-lss-$$T && \
	$(VENV)/bin/lssfl report runs/demo-fedavg-$$T runs/demo-lss-$$T --out runs/demo-report-$$T

# -rs: every skipped test is listed with its reason. -n 2: two workers (pytest-xdist); the
# process-level tests mostly wait on their coordinators and silos, so two share two cores well
# (4.7 minutes on a quiet 2-core machine).
test: $(STAMP) proto-check lint typecheck
	$(PY) -m pytest -rs -n 2 tests

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

# mypy over the package (about 20 s of CPU cold, 1-2 s with .mypy_cache).
typecheck: $(STAMP)
	$(PY) tools/typecheck.py

# Regenerate the committed gRPC stubs in stubs/ from proto/.
proto: $(STAMP)
	$(PY) tools/gen_proto.py

proto-check: $(STAMP)
	$(PY) tools/gen_proto.py --check

clean:
	rm -rf $(VENV) runs build *.egg-info .mypy_cache
