# The two commands of the README:  make run  (the proxy in front of the built-in V3 emulator)
#                                   make test (the whole test suite)
# Both set up a virtual environment in .venv first (once, and again when pyproject.toml changes).
PYTHON ?= python3
VENV ?= .venv
HOST ?= 127.0.0.1
PORT ?= 8080
RUN_ARGS ?=

.PHONY: install run test bench clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet --upgrade pip
	$(VENV)/bin/python -m pip install --quiet -e '.[test]'
	touch $@

# RUN_ARGS: more options of serve, e.g. RUN_ARGS=--emulate-v2 (a legacy V2 beside it: gradual migration offline)
run: install
	$(VENV)/bin/upscale-v2-proxy serve --emulate-v3 --host $(HOST) --port $(PORT) $(RUN_ARGS)

# the Redis stores' tests need a real redis-server, the dashboard's chromium and chromedriver, the
# migration snippets' tests Go (and node, curl): installed here when root, else those tests skip (fail under CI=true)
test: install
	@command -v redis-server >/dev/null || [ "$$(id -u)" -ne 0 ] || { apt-get update && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends redis-server; }
	@{ command -v chromium && command -v chromedriver; } >/dev/null || [ "$$(id -u)" -ne 0 ] || { apt-get update && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends chromium chromium-driver; }
	@{ command -v go && command -v node && command -v curl; } >/dev/null || [ "$$(id -u)" -ne 0 ] || { \
		apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends golang-go \
		$$(command -v node >/dev/null || echo nodejs) $$(command -v curl >/dev/null || echo curl); }
	$(VENV)/bin/python -m pytest $(PYTEST_ARGS)

bench: install
	tests/bench/run.sh
	$(VENV)/bin/python -m tests.bench.compose
	$(VENV)/bin/python -m tests.bench.polls
	$(VENV)/bin/python -m tests.bench.load
	$(VENV)/bin/python -m tests.bench.usage
	@echo; echo "issue 11's table again (tests/bench/run.sh, above):"; cat "$$(ls -t tests/bench/results/*.md | head -1)"
	@# last: its own report (tests/bench/results/*-soak.md); it fails the target on client-visible failures
	$(VENV)/bin/python -m tests.bench.soak

clean:
	rm -rf $(VENV) .pytest_cache
