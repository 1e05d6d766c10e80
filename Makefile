# Two set-up commands for a fresh machine: `make demo` and `make test`.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test install fashion-mnist fortunes chromium clean

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PY) -m venv $(VENV) || python3 -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check -e '.[test]'
	@touch $(STAMP)

install: $(STAMP)

# Debian's copy of the original Fashion-MNIST IDX files, when we are root and no copy is found.
fashion-mnist:
	@if [ ! -d /usr/share/datasets/fashion-mnist ] && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		echo "installing Debian's dataset-fashion-mnist"; \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 || \
		(apt-get update -q >/dev/null 2>&1 && DEBIAN_FRONTEND=noninteractive apt-get install -y -q dataset-fashion-mnist >/dev/null) || \
		echo "could not install dataset-fashion-mnist; the real-data test will be skipped"; \
	fi

# Debian's fortunes: the offline English corpus of the language models (data.text.source corpus).
fortunes:
	@if [ ! -d /usr/share/games/fortunes ] && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		echo "installing Debian's fortunes"; \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -q fortunes >/dev/null 2>&1 || \
		(apt-get update -q >/dev/null 2>&1 && DEBIAN_FRONTEND=noninteractive apt-get install -y -q fortunes >/dev/null) || \
		echo "could not install fortunes; the real-corpus tests will be skipped"; \
	fi

# Debian's headless Chromium for the browser test of the MLflow UI (tests/test_browser.py), when we are root.
chromium:
	@if ! command -v chromium >/dev/null && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		echo "installing Debian's chromium"; \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium >/dev/null 2>&1 || \
		(apt-get update -q >/dev/null 2>&1 && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium >/dev/null) || \
		echo "could not install chromium; the browser test will be skipped"; \
	fi

# The main job: a small real sweep on Fashion-MNIST (6 trials, 2 at a time); prints the report and the UI command.
# Running it again finishes (or re-reports) the same sweep instead of refusing an existing name.
demo: $(STAMP) fashion-mnist fortunes
	$(BIN)/raymoe tune tune_configs/sweeps/demo_fmnist.yaml $$(test -d ray_results/sweeps/demo_fmnist && echo --resume)

test: $(STAMP) fashion-mnist fortunes chromium
	$(BIN)/python -m pytest -q -x --durations=15

clean:
	rm -rf $(VENV) mlflow.db checkpoints ray_results
