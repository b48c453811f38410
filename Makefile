# qrunner's make targets. A fresh Debian 12 needs only: apt-get install -y make python3-venv
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test install-test-deps bench clean

$(STAMP): setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

## demo: plan the shipped example snapshot with relayout.lua at 10:00 (changes nothing)
demo: $(STAMP)
	$(BIN)/qrunner --config /dev/null plan --queue-file examples/queue.jsonl --script relayout.lua --now 2026-11-25T10:00:00

## test: install what the tests need (as root on Debian: Postfix), then run every test
test: $(STAMP) install-test-deps
	$(BIN)/python -m pytest

install-test-deps:
	@if [ -x tests/setup/install-postfix.sh ]; then tests/setup/install-postfix.sh; fi

clean:
	rm -rf $(VENV) .pytest_cache *.egg-info
