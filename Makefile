# Set-up from a fresh clone, idempotent: `make demo` and `make test` each install what they need.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
INSTALLED := $(VENV)/.installed
FASHION_MNIST := /usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz
DEMO := runs/demo
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: setup data demo test lint clean

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

# The IntRS flagship on Fashion-MNIST: noise-train an fp32 CNN (sigma = 0.25), fine-tune it with
# discrete-noise quantization-aware training, convert it to int8, certify 500 test images with
# FloatRS-fp (fp32) and IntRS-quant (integer-only), print both rows side by side with the measured
# speed-up, and save the plot. Re-running resumes instead of starting over.
demo: setup
	$(BIN)/qrobust train --dataset fashion-mnist --model cnn --sigma 0.25 --epochs 5 --lr 0.05 --lr-step 3 \
		--batch-size 128 --seed 0 --resume --output $(DEMO)/cnn.pt
	$(BIN)/qrobust train --init $(DEMO)/cnn.pt --qat --noise discrete --sigma 0.25 --epochs 2 --lr 0.005 \
		--batch-size 128 --seed 0 --resume --output $(DEMO)/cnn-qat.pt
	$(BIN)/qrobust quantize $(DEMO)/cnn-qat.pt --overwrite --output $(DEMO)/cnn.int8.pt
	$(BIN)/qrobust certify $(DEMO)/cnn.pt --method float-fp --sigma 0.25 --n0 100 --n 1000 --alpha 0.001 \
		--num-examples 500 --noise-bank --seed 0 --overwrite --output $(DEMO)/certify-float-fp.tsv
	$(BIN)/qrobust certify $(DEMO)/cnn.int8.pt --method int --sigma 0.25 --n0 100 --n 1000 --alpha 0.001 \
		--num-examples 500 --noise-bank --seed 0 --overwrite --output $(DEMO)/certify-int.tsv
	$(BIN)/qrobust analyze $(DEMO)/certify-float-fp.tsv $(DEMO)/certify-int.tsv --label FloatRS-fp \
		--label IntRS-quant --plot $(DEMO)/certified_accuracy.png --overwrite

# Only one test reads the real Fashion-MNIST (it is skipped without it), so a failed install does not stop the suite.
test: $(INSTALLED)
	-@$(MAKE) --no-print-directory data
	$(BIN)/python -m pytest

# ruff (lint and format) and mypy, configured in pyproject.toml; CI runs this beside the tests.
lint: $(INSTALLED)
	$(BIN)/ruff check src tests bench examples
	$(BIN)/ruff format --check src tests bench examples
	$(BIN)/mypy

clean:
	rm -rf $(VENV) $(DEMO) build src/*.egg-info
