# Two commands do all set-up from a fresh clone: `make serve` and `make test`.
PY ?= python3
STAMP := .install.stamp

$(STAMP): pyproject.toml
	$(PY) -m pip install -q torch==2.13.0 || $(PY) -m pip install -q "torch>=2.4"
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

serve: $(STAMP)
	$(PY) -m tandem.cli serve $(ARGS)

test: $(STAMP)
	$(PY) -m pytest -q $(PYTEST_ARGS)

.PHONY: install serve test
