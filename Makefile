# `make demo` and `make test` install into .venv first (scripts/install.sh; idempotent).
PY := .venv/bin/python
STAMP := .venv/.ihgrpo-installed

.PHONY: install demo test bench
install: $(STAMP)

$(STAMP): pyproject.toml scripts/install.sh
	bash scripts/install.sh
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m ihgrpo.cli demo --out runs/demo

test: $(STAMP)
	$(PY) -m pytest -q

bench: $(STAMP)
	$(PY) bench/sandbox.py
