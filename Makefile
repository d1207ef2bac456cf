PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export IDV_HOST ?= 127.0.0.1
export IDV_PORT ?= 8000

.PHONY: setup run test migrate bench eval clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[train,test]'
	touch $(STAMP)

setup: $(STAMP)

run: setup
	mkdir -p var
	$(BIN)/idverify migrate
	$(BIN)/idverify serve

test: setup
	$(BIN)/python -m pytest -q

bench: setup
	$(BIN)/python bench/latency.py

clean:
	rm -rf $(VENV) var reports
