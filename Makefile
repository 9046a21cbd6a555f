# Two commands do all set-up on a fresh machine with Python 3.11+:
#   make demo   - the sandbox on loopback and one round for every persona (no keys needed)
#   make test   - the whole suite
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
# Prometheus's own rule checker for deploy/ (tests/test_deploy.py); not on PyPI.
PROMTOOL := $(VENV)/promtool/promtool

.PHONY: demo test serve lock clean

$(VENV)/.installed: requirements.lock requirements-test.lock pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements-test.lock
	$(PY) -m pip install --quiet --no-deps -e .
	touch $@

# promtool from Debian's prometheus package, unpacked here without installing the service; once.
$(PROMTOOL):
	rm -rf $(VENV)/promtool && mkdir -p $(VENV)/promtool/deb
	cd $(VENV)/promtool/deb && { apt-get download prometheus || { apt-get update -qq && apt-get download prometheus; }; }
	dpkg-deb --fsys-tarfile $(VENV)/promtool/deb/prometheus_*.deb | tar -x -C $(VENV)/promtool/deb ./usr/bin/promtool
	mv $(VENV)/promtool/deb/usr/bin/promtool $@ && rm -rf $(VENV)/promtool/deb
	$@ --version >/dev/null

demo: $(VENV)/.installed
	$(PY) -m runner demo

# The report's page is checked in a real headless browser (tests/test_report.py): Debian's chromium,
# installed here when missing (CI runs as root on a clean clone; Playwright cannot fetch a browser here).
CHROMIUM := /usr/bin/chromium

$(CHROMIUM):
	apt-get install -y --no-install-recommends chromium || { apt-get update && apt-get install -y --no-install-recommends chromium; }

# Two workers, a test file each at a time (module fixtures stay shared within a file): the suite
# mostly waits on subprocesses and loopback HTTP, so two cores take it in about half the time.
test: $(VENV)/.installed $(PROMTOOL) $(CHROMIUM)
	$(PY) -m pytest -q -n 2 --dist loadfile

serve: $(VENV)/.installed
	$(PY) -m runner serve

# Re-pin after changing dependencies in pyproject.toml.
lock:
	rm -rf /tmp/persona-lock && $(PYTHON) -m venv /tmp/persona-lock
	/tmp/persona-lock/bin/pip install --quiet . && /tmp/persona-lock/bin/pip freeze --exclude persona-runner > /tmp/persona-runtime.txt
	/tmp/persona-lock/bin/pip install --quiet '.[test]' && /tmp/persona-lock/bin/pip freeze --exclude persona-runner > /tmp/persona-all.txt
	{ echo "# Runtime dependencies, pinned: the demo, CI and the container install exactly this set."; echo "# Regenerate: make lock"; cat /tmp/persona-runtime.txt; } > requirements.lock
	{ echo "# Test-only additions on top of requirements.lock. Regenerate: make lock"; echo "-r requirements.lock"; \
	  grep -vxFf /tmp/persona-runtime.txt /tmp/persona-all.txt; } > requirements-test.lock

clean:
	rm -rf $(VENV) state
