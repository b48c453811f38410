# qrunner's make targets. A fresh Debian 12 needs only: apt-get install -y make python3-venv
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

PREFIX ?= /opt/qrunner
# As root the test setup installs Postfix, so skipping an MTA test is an error.
REQUIRE_MTA := $(shell [ "$$(id -u)" = 0 ] && echo 1)

# The orchestration must be covered by the memory back end's end-to-end cases alone (any machine, seconds).
COVERED := runner plan executor
COVER_UNDER := 90

.PHONY: demo test coverage install-test-deps install clean

$(STAMP): setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

## demo: plan the shipped example snapshot with relayout.lua at 10:00 (changes nothing)
demo: $(STAMP)
	$(BIN)/qrunner --config /dev/null plan --queue-file examples/queue.jsonl --script relayout.lua --now 2026-11-25T10:00:00

## test: install what the tests need (as root on Debian: Postfix, and a private Exim beside it), then run every
## test once: the memory cases under the coverage gate, then all the others
test: $(STAMP) install-test-deps coverage
	QRUNNER_REQUIRE_MTA=$${QRUNNER_REQUIRE_MTA:-$(REQUIRE_MTA)} $(BIN)/python -m pytest -m "not memory"

## coverage: the memory back end's cases alone cover each of qrunner/{runner,plan,executor}.py to 90% (subprocesses included)
coverage: $(STAMP)
	rm -f .coverage .coverage.*
	$(BIN)/python -m pytest -q -m memory $(COVERED:%=--cov=qrunner.%) --cov-report=term --cov-fail-under=$(COVER_UNDER)
	for module in $(COVERED); do \
	    $(BIN)/python -m coverage report --include="*/qrunner/$$module.py" --fail-under=$(COVER_UNDER) || exit 1; done

install-test-deps:
	bash tests/setup/install-postfix.sh
	bash tests/setup/install-exim.sh

## install: qrunner in its own venv under $(PREFIX), /usr/local/bin/qrunner, /etc/qrunner, systemd units
install:
	$(PYTHON) -m venv $(PREFIX)
	$(PREFIX)/bin/pip install --quiet .
	ln -sf $(PREFIX)/bin/qrunner /usr/local/bin/qrunner
	install -d -m 755 /etc/qrunner
	[ -e /etc/qrunner/relayout.lua ] || install -m 644 relayout.lua /etc/qrunner/relayout.lua
	[ -e /etc/qrunner/qrunner.toml ] || install -m 644 contrib/qrunner.toml /etc/qrunner/qrunner.toml
	install -d -m 755 /usr/local/share/doc/qrunner
	install -m 644 README.md /usr/local/share/doc/qrunner/README.md
	if [ -d /etc/systemd/system ]; then install -m 644 contrib/systemd/qrunner.service contrib/systemd/qrunner.timer /etc/systemd/system/; fi

clean:
	rm -rf $(VENV) .pytest_cache *.egg-info
