# The two quick-start commands: `make demo` and `make test`. Both create .venv when it is
# missing and install the package with its dev extras.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
PYTEST_ARGS ?=

.PHONY: install demo test test-unit browser-deps data-deps clean

$(STAMP): pyproject.toml
	@test -x $(PY) || python3 -m venv $(VENV)
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
