# qrunner's make targets. A fresh Debian 12 needs only: apt-get install -y make python3-venv
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

# Where `make install` puts qrunner and `make uninstall` takes it away from. Override them to install into a
# scratch tree (the tests do) or to package. Only where files go changes: qrunner itself reads
# /etc/qrunner/qrunner.toml unless --config or QRUNNER_CONFIG names another file.
# PREFIX: qrunner's own venv. BINDIR: the qrunner command (a link into the venv). CONFDIR: qrunner.toml and
# relayout.lua, installed once and never overwritten. SYSTEMD_DIR: qrunner.service and qrunner.timer,
# installed disabled. DOCDIR: README.md and contrib/ (the gate files, the example config, the cron example).
# MANDIR: the manual pages qrunner(8), qrunner.toml(5), qrunner-policy(7), under man8/, man5/, man7/.
# CRON_DIR, CRONTAB: only looked at, by uninstall, for a cron line that still starts qrunner (root's own
# crontab is the admin's to check: crontab -l). SYSTEMCTL: how
# uninstall stops and disables the timer (the tests give a stand-in).
PREFIX ?= /opt/qrunner
BINDIR ?= /usr/local/bin
CONFDIR ?= /etc/qrunner
SYSTEMD_DIR ?= /etc/systemd/system
DOCDIR ?= /usr/local/share/doc/qrunner
MANDIR ?= /usr/local/share/man
CRON_DIR ?= /etc/cron.d
CRONTAB ?= /etc/crontab
SYSTEMCTL ?= systemctl
# As root the test setup installs Postfix, so skipping an MTA test is an error.
REQUIRE_MTA := $(shell [ "$$(id -u)" = 0 ] && echo 1)

# The orchestration must be covered by the memory back end's end-to-end cases alone (any machine, seconds).
COVERED := runner plan executor
COVER_UNDER := 90

.PHONY: demo test coverage install-test-deps install uninstall clean bench reliability man deb

# make bench: the queue sizes to build in each MTA, separated by commas or spaces (about 39 KB of mail per message,
# so 100,000 is 3.9 GB per MTA),
# the rounds per figure, and the messages each dispatch benchmark sends. The bench-only venv holds the tools it
# compares against or profiles with (pymailq, py-spy), never qrunner's own.
SIZES ?= 1000,10000,100000
BENCH_REPEAT ?= 3
BENCH_DISPATCH ?= 1000
BENCH_VENV := .bench-venv
BENCH_STAMP := $(BENCH_VENV)/.installed

$(STAMP): setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

## demo: plan the shipped example snapshot with relayout.lua at 10:00 (changes nothing). As root, strict modes
## refuse a script in a checkout others could change (a copy under /tmp, say), so root's demo plans a copy of
## relayout.lua in a directory of root's own under /run, removed afterwards.
demo: $(STAMP)
	@script=relayout.lua; dir=; \
	if [ "$$(id -u)" = 0 ] && dir=$$(mktemp -d /run/qrunner-demo.XXXXXX 2>/dev/null); then \
	    install -m 644 relayout.lua $$dir/relayout.lua && script=$$dir/relayout.lua; fi; \
	echo "$(BIN)/qrunner --config /dev/null plan --queue-file examples/queue.jsonl --script $$script --now 2026-11-25T10:00:00"; \
	$(BIN)/qrunner --config /dev/null plan --queue-file examples/queue.jsonl --script $$script --now 2026-11-25T10:00:00; \
	status=$$?; [ -z "$$dir" ] || rm -rf "$$dir"; exit $$status

## test: install what the tests need (as root on Debian: Postfix, and a private Exim beside it), then run every
## test once: the memory cases under the coverage gate, then all the others
test: $(STAMP) install-test-deps $(BENCH_STAMP) coverage
	QRUNNER_REQUIRE_MTA=$${QRUNNER_REQUIRE_MTA:-$(REQUIRE_MTA)} $(BIN)/python -m pytest -m "not memory" --durations=25

## coverage: the memory back end's cases alone cover each of qrunner/{runner,plan,executor}.py to 90% (subprocesses included)
coverage: $(STAMP)
	rm -f .coverage .coverage.*
	QRUNNER_REQUIRE_MTA=$${QRUNNER_REQUIRE_MTA:-$(REQUIRE_MTA)} $(BIN)/python -m pytest -q -m memory $(COVERED:%=--cov=qrunner.%) --cov-report=term --cov-fail-under=$(COVER_UNDER)
	for module in $(COVERED); do \
	    $(BIN)/python -m coverage report --include="*/qrunner/$$module.py" --fail-under=$(COVER_UNDER) || exit 1; done

## bench: build real queues of $(SIZES) messages in a private Postfix and the private Exim (as root), measure
## qrunner against the MTAs' own tools, write BENCHMARKS.md and the README's headline (see README "Benchmarks")
bench: $(STAMP) install-test-deps $(BENCH_STAMP)
	$(BIN)/python bench/run.py --sizes "$(SIZES)" --repeat $(BENCH_REPEAT) --dispatch $(BENCH_DISPATCH) \
	    --bench-venv $(BENCH_VENV) --json bench/out/results.json

## reliability: run the fault-injection, hostile-input and load cases at full length (QRUNNER_LONG=1: more
## rounds, more generated inputs, the long load runs) and write their figures into RELIABILITY.md
reliability: $(STAMP) install-test-deps
	rm -f bench/out/reliability.jsonl; mkdir -p bench/out
	QRUNNER_LONG=1 QRUNNER_FIGURES=$(CURDIR)/bench/out/reliability.jsonl \
	    QRUNNER_REQUIRE_MTA=$${QRUNNER_REQUIRE_MTA:-$(REQUIRE_MTA)} $(BIN)/python -m pytest -q -m reliability
	$(BIN)/python tests/reliability_report.py bench/out/reliability.jsonl RELIABILITY.md

$(BENCH_STAMP):
	$(PYTHON) -m venv $(BENCH_VENV)
	$(BENCH_VENV)/bin/pip install --quiet --upgrade pip
	$(BENCH_VENV)/bin/pip install --quiet pymailq==0.9.0 py-spy
	touch $@

## man: write the manual pages (man/qrunner.8, man/qrunner.toml.5, man/qrunner-policy.7) and contrib/qrunner.toml
## from their one source each: the prose in man/*.md, qrunner's argparse definitions, qrunner/settings.py and the
## exit codes in qrunner/exceptions.py. They are committed; tests/test_man.py fails when they differ from a build.
man: $(STAMP)
	$(BIN)/python man/build.py

install-test-deps:
	sh contrib/create-script-user.sh
	bash tests/setup/install-postfix.sh
	bash tests/setup/install-exim.sh
	bash tests/setup/install-log-daemons.sh
	bash tests/setup/install-man-tools.sh
	bash tests/setup/install-deb-tools.sh

# What install puts under DOCDIR, each file at its path in this repository: the README and all of contrib/.
DOC_FILES := README.md $(shell find contrib -type f ! -name '*~' | LC_ALL=C sort)
UNITS := qrunner.service qrunner.timer
# Each page goes into the section directory its name ends with: man/qrunner.8 -> $(MANDIR)/man8/qrunner.8.
MAN_PAGES := man/qrunner.8 man/qrunner.toml.5 man/qrunner-policy.7
INSTALLED_PAGES := $(foreach page,$(MAN_PAGES),$(MANDIR)/man$(subst .,,$(suffix $(page)))/$(notdir $(page)))
# Installed copies name the installed command, documentation and units (the same paths unless BINDIR/DOCDIR/
# SYSTEMD_DIR differ).
PLACE = sed -e 's|/usr/local/bin/qrunner|$(BINDIR)/qrunner|g' -e 's|/usr/local/share/doc/qrunner|$(DOCDIR)|g' \
	-e 's|/etc/systemd/system/qrunner|$(SYSTEMD_DIR)/qrunner|g'
# The removal rule lives in qrunner itself (README "Undo it all"), so a package follows the same one.
RELEASE_FOR_REMOVAL = $(PREFIX)/bin/qrunner $(if $(wildcard $(CONFDIR)/qrunner.toml),--config $(CONFDIR)/qrunner.toml) \
	release --for-removal $(if $(filter yes,$(GATE_REMOVED)),--gate-removed)

## install: qrunner in its own venv under $(PREFIX), $(BINDIR)/qrunner, $(CONFDIR) (an MTA-neutral example
## config, relayout.lua), the systemd units (disabled), README and contrib/ under $(DOCDIR), the manual pages under
## $(MANDIR). Run it here, at the
## top of the repository (or make -C DIR install).
install:
	@if [ -n "$$(ls -A $(PREFIX) 2>/dev/null)" ] && [ ! -e $(PREFIX)/pyvenv.cfg ]; then \
	    echo "make install: $(PREFIX) holds files and is not a venv; choose another PREFIX." >&2; exit 1; fi
	rm -rf build
	$(PYTHON) -m venv $(PREFIX)
	$(PREFIX)/bin/pip install --quiet .
	install -d -m 755 $(BINDIR) $(CONFDIR)
	ln -sfn $(PREFIX)/bin/qrunner $(BINDIR)/qrunner
	sh contrib/create-script-user.sh _qrunner
	[ -e $(CONFDIR)/relayout.lua ] || install -m 644 relayout.lua $(CONFDIR)/relayout.lua
	[ -e $(CONFDIR)/qrunner.toml ] || install -m 644 contrib/qrunner.toml $(CONFDIR)/qrunner.toml
	@for file in $(DOC_FILES); do install -d -m 755 $(DOCDIR)/$$(dirname $$file) && \
	    $(PLACE) $$file > $(DOCDIR)/$$file.new && chmod 644 $(DOCDIR)/$$file.new && \
	    mv $(DOCDIR)/$$file.new $(DOCDIR)/$$file || exit 1; done; \
	echo "make install: README.md and contrib/ (the gate files, the cron example) are in $(DOCDIR)"
	@for page in $(MAN_PAGES); do dir=$(MANDIR)/man$${page##*.}; install -d -m 755 $$dir && \
	    $(PLACE) $$page > $$dir/$${page#man/}.new && chmod 644 $$dir/$${page#man/}.new && \
	    mv $$dir/$${page#man/}.new $$dir/$${page#man/} || exit 1; done; \
	echo "make install: the manual pages are in $(MANDIR): man qrunner, man qrunner.toml, man qrunner-policy"
	@if [ -d $(SYSTEMD_DIR) ]; then for unit in $(UNITS); do \
	    $(PLACE) contrib/systemd/$$unit > $(SYSTEMD_DIR)/$$unit.new && chmod 644 $(SYSTEMD_DIR)/$$unit.new && \
	    mv $(SYSTEMD_DIR)/$$unit.new $(SYSTEMD_DIR)/$$unit || exit 1; done; \
	    echo "make install: $(UNITS) are in $(SYSTEMD_DIR), disabled: put the gate in place, check it with" \
	         "'qrunner run --dry-run', then: systemctl daemon-reload && systemctl enable --now qrunner.timer"; \
	else echo "make install: no $(SYSTEMD_DIR), so no systemd units; the cron example is" \
	          "$(DOCDIR)/contrib/cron/qrunner"; fi

## uninstall: the way out, once the gate is removed (README "Undo it all"): release every qrunner hold
## (refused while the MTA is still gated for qrunner; GATE_REMOVED=yes when qrunner cannot tell and you
## checked), stop the timer, remove the command, the venv, the units, the examples and the manual pages. $(CONFDIR) and
## qrunner's state directory stay.
uninstall:
ifeq ($(wildcard $(PREFIX)/bin/qrunner $(BINDIR)/qrunner $(addprefix $(SYSTEMD_DIR)/,$(UNITS)) $(DOCDIR)),)
	@echo "make uninstall: qrunner is not installed here; $(CONFDIR) and its state directory, if there," \
	      "are yours to keep or delete."
else
	@if [ ! -e $(PREFIX)/bin/qrunner ]; then \
	    echo "make uninstall: there is no $(PREFIX)/bin/qrunner, so qrunner's holds cannot be released;" \
	         "run make install first (it keeps $(CONFDIR) as it is), then make uninstall." >&2; exit 1; fi
	@cron=$$(grep -lsE '^[^#]*qrunner' $(CRON_DIR)/* $(CRONTAB) 2>/dev/null); if [ -n "$$cron" ]; then \
	    echo "make uninstall: $$cron still starts qrunner from cron; remove it (or its qrunner line) first." \
	         "Nothing was changed." >&2; exit 1; fi
	$(RELEASE_FOR_REMOVAL)
	@if [ -e $(SYSTEMD_DIR)/qrunner.timer ] && command -v $(SYSTEMCTL) >/dev/null; then \
	    if [ -d /run/systemd/system ]; then echo "$(SYSTEMCTL) disable --now qrunner.timer"; \
	        $(SYSTEMCTL) disable --now qrunner.timer || exit 1; \
	    else echo "$(SYSTEMCTL) disable qrunner.timer"; $(SYSTEMCTL) disable qrunner.timer || exit 1; fi; fi
	@echo "make uninstall: releasing again whatever a run started meanwhile may have held"
	$(RELEASE_FOR_REMOVAL)
	rm -f $(addprefix $(SYSTEMD_DIR)/,$(UNITS))
	@if [ -d /run/systemd/system ] && command -v $(SYSTEMCTL) >/dev/null; then $(SYSTEMCTL) daemon-reload; fi
	@if [ "$$(readlink $(BINDIR)/qrunner)" = $(PREFIX)/bin/qrunner ]; then echo "rm -f $(BINDIR)/qrunner"; \
	    rm -f $(BINDIR)/qrunner; fi
	@if [ -e $(PREFIX)/pyvenv.cfg ]; then echo "rm -rf $(PREFIX)"; rm -rf $(PREFIX); fi
	@echo "rm -f $(DOCDIR)/{README.md,contrib/...}"; rm -f $(addprefix $(DOCDIR)/,$(DOC_FILES))
	@if [ -d $(DOCDIR) ]; then find $(DOCDIR) -depth -type d -empty -delete; fi
	@echo "rm -f $(INSTALLED_PAGES)"; rm -f $(INSTALLED_PAGES)
	@for dir in $(sort $(dir $(INSTALLED_PAGES))); do [ ! -d $$dir ] || rmdir --ignore-fail-on-non-empty $$dir; done
	@echo "make uninstall: qrunner is removed. Left in place, yours to keep or delete:"
	@echo "  $(CONFDIR): your configuration and policy, as you edited them"
	@echo "  qrunner's state directory, named in the 'ready for removal' line above: its records of holds and runs"
	@if [ -d $(DOCDIR) ]; then echo "  $(DOCDIR): files this version did not install:"; \
	    find $(DOCDIR) -type f | sed 's/^/    /'; fi
endif

# make deb builds in a copy of this tree under build/deb (debhelper's files stay out of the repository), from
# everything here but the venvs, caches and earlier builds; the package lands at the top: ./qrunner_*.deb.
DEB_BUILD := build/deb
DEB_EXCLUDE := .git .venv $(BENCH_VENV) build dist bench/out .pytest_cache '*.egg-info' '.coverage*' __pycache__ \
	'qrunner_*.deb'

## deb: build the Debian package ./qrunner_VERSION_ARCH.deb with dh-virtualenv (Debian 12; README "Install from
## the Debian package"). As root it first installs the build dependencies debian/control names (apt-get
## build-dep ./); otherwise it says what to install.
deb:
	@if command -v dpkg-checkbuilddeps >/dev/null && dpkg-checkbuilddeps 2>/dev/null; then :; \
	elif [ "$$(id -u)" = 0 ]; then echo "make deb: installing the build dependencies: apt-get build-dep ./"; \
	    DEBIAN_FRONTEND=noninteractive apt-get build-dep -y -q ./ || { apt-get update -q && \
	    DEBIAN_FRONTEND=noninteractive apt-get build-dep -y -q ./; } || exit 1; \
	else echo "make deb: the build dependencies are missing; as root: apt-get build-dep ./ (debhelper," \
	          "dh-virtualenv, python3-dev, python3-venv, build-essential), or run make deb as root." >&2; exit 1; fi
	rm -rf $(DEB_BUILD) && mkdir -p $(DEB_BUILD)/qrunner
	tar -c $(DEB_EXCLUDE:%=--exclude=./%) . | tar -x -C $(DEB_BUILD)/qrunner
	cd $(DEB_BUILD)/qrunner && dpkg-buildpackage -b -us -uc
	rm -f qrunner_*.deb && mv $(DEB_BUILD)/qrunner_*.deb .
	@echo "make deb: built $$(ls qrunner_*.deb); install it with: apt-get install ./$$(ls qrunner_*.deb)"

clean:
	rm -rf $(VENV) $(BENCH_VENV) bench/out .pytest_cache *.egg-info build qrunner_*.deb
