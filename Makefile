# Set-up from a fresh clone, idempotent: `make demo` and `make test` each install what they need.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
INSTALLED := $(VENV)/.installed
FASHION_MNIST := /usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz
DEMO := runs/demo
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: setup data demo test clean

# torch is pinned to the CPU wheel: an unpinned torch pulls a multi-GB CUDA build.
$(INSTALLED): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

data:
	@if [ -f $(FASHION_MNIST) ]; then \
		echo "Fashion-MNIST: found in $(dir $(FASHION_MNIST))"; \
	elif [ "$$(id -u)" = 0 ]; then \
		apt-get install -y -q dataset-fashion-mnist || (apt-get update -q && apt-get install -y -q dataset-fashion-mnist); \
	else \
		echo "Fashion-MNIST is missing: run 'sudo apt-get install dataset-fashion-mnist' and try again" >&2; exit 1; \
	fi

setup: $(INSTALLED) data

# Noise-train a CNN at sigma = 0.25 on Fashion-MNIST, certify 500 test images by randomized smoothing,
# print the certified-accuracy table and save the plot. Re-running resumes instead of starting over.
demo: setup
	$(BIN)/qrobust train --dataset fashion-mnist --model cnn --sigma 0.25 --epochs 5 --lr 0.05 --lr-step 3 \
		--batch-size 128 --seed 0 --resume --output $(DEMO)/cnn.pt
	$(BIN)/qrobust certify $(DEMO)/cnn.pt --sigma 0.25 --n0 100 --n 1000 --alpha 0.001 \
		--num-examples 500 --seed 0 --overwrite --output $(DEMO)/certify.tsv
	$(BIN)/qrobust analyze $(DEMO)/certify.tsv --label "sigma=0.25" --plot $(DEMO)/certified_accuracy.png

test: setup
	$(BIN)/python -m pytest

clean:
	rm -rf $(VENV) $(DEMO) build src/*.egg-info
