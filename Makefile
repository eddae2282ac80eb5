# Quick start: `make demo` (Swiss roll on CPU, a few minutes) and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: demo test venv clean

venv: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -c constraints.txt -e ".[test]"
	touch $(STAMP)

# The Swiss roll with the settings `thermodiff train vectors` derives from any data, on its
# config's 3-minute budget (configs/swissroll.toml).
demo: $(STAMP)
	$(BIN)/thermodiff reproduce swissroll --out runs/demo --overwrite

test: $(STAMP)
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) runs
