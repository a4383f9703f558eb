# Two commands do all set-up from a fresh clone: `make serve` and `make test`.
PY ?= python3
STAMP := .install.stamp

COMPILED := .compiled.stamp
# the simulator's hot path, compiled with mypyc when a C compiler is there (tandem/compile.py); rebuilt when
# one of them changes, so a test never runs a stale extension
HOT := $(shell $(PY) -c "import runpy; print(' '.join(m.replace('.', '/') + '.py' for m in runpy.run_path('tandem/_compiled.py')['MODULES']))")

$(STAMP): pyproject.toml
	$(PY) -m pip install -q torch==2.13.0 || $(PY) -m pip install -q "torch>=2.4"
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

$(COMPILED): $(STAMP) $(HOT) tandem/compile.py tandem/_compiled.py
	$(PY) -m tandem.compile --optional
	touch $(COMPILED)

install: $(STAMP) $(COMPILED)

serve: $(STAMP) $(COMPILED)
	$(PY) -m tandem.cli serve $(ARGS)

test: $(STAMP) $(COMPILED)
	$(PY) -m pytest -q $(PYTEST_ARGS)

.PHONY: install serve test
