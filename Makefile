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

# A shortened Swiss roll run (20k of the config's 60k steps, learning rate decayed sooner);
# `thermodiff reproduce swissroll` is the full one. One thread: this small network runs 3x
# faster on one thread than on two when anything else is using the second core.
demo: $(STAMP)
	OMP_NUM_THREADS=1 $(BIN)/thermodiff reproduce swissroll --steps 20000 --set train.lr_decay_every=7000 --out runs/demo --overwrite

test: $(STAMP)
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) runs
