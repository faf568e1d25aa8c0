# The two quick-start commands: `make demo` and `make test`. Both create .venv when it is
# missing and install the package with its dev extras.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
PYTEST_ARGS ?=

.PHONY: install demo test test-unit browser-deps data-deps clean

PYTHON ?= python3

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 10))' || \
		{ echo "LatentForge needs Python 3.10 or newer; run make PYTHON=python3.11 ..." >&2; exit 1; }
	@# a venv left without pip (Debian/Ubuntu without python3-venv) is made again, not reused
	@$(PY) -m pip --version >/dev/null 2>&1 || { rm -rf $(VENV) && $(PYTHON) -m venv $(VENV); } || \
		{ echo "cannot create $(VENV): install python3-venv (apt-get install python3-venv)" >&2; exit 1; }
	$(PY) -m pip install -q --disable-pip-version-check -e '.[dev]'
	@touch $(STAMP)

install: $(STAMP)

demo: install
	$(PY) -m latentforge.demo

test: install
	$(PY) -m pytest tests $(PYTEST_ARGS)

test-unit: install
	$(PY) -m pytest tests/unit $(PYTEST_ARGS)

# Debian's chromium for the playground's browser test (the test skips without it).
browser-deps:
	@command -v chromium >/dev/null || (apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium)

# the Debian packages behind `latentforge data prepare crawl-tiles | emoji | fashion-mnist`
data-deps:
	@(test -f /usr/share/crawl/dat/tiles/main.png && test -f /usr/share/fonts/truetype/noto/NotoColorEmoji.ttf && \
		test -f /usr/share/unicode/emoji/emoji-test.txt && test -f /usr/share/datasets/fashion-mnist/t10k-labels-idx1-ubyte.gz) || \
		(apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q crawl-tiles-data fonts-noto-color-emoji \
		unicode-data dataset-fashion-mnist)

clean:
	rm -rf demo-output runs .pytest_cache
