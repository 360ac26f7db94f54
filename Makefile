# The README's two set-up commands are `make tiny` (the main job) and `make test`.
# Both create .venv on first use and install Trellis into it (torch pinned by constraints.txt).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TINY_DATA := data/tiny

.PHONY: install tiny tiny-data tiny-prepare-data test lint format clean

install: $(VENV)/.installed

$(VENV)/.installed: setup.cfg pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -c constraints.txt -e ".[dev,deepspeed,gptq]"
	# Without a GPU, DeepSpeed compiles its shared-memory communication op on first use (1.5-3 min on
	# 2 cores); compile it once here rather than inside the first ZeRO-3 run (cached in ~/.cache/torch_extensions).
	$(BIN)/python -c "from deepspeed.accelerator import get_accelerator as a; \
		a().device_name() == 'cpu' and a().create_op_builder('ShareMemCommBuilder').load(verbose=False)"
	touch $@

tiny-data: install
	$(BIN)/trellis tiny-data --output_dir $(TINY_DATA)

# The data stage on the tiny corpus: packed blocks, a trained tokenizer and a report in outputs/tiny/data.
tiny-prepare-data: tiny-data
	HF_HUB_OFFLINE=1 $(BIN)/python scripts/prepare_data.py --config recipes/tiny/data.yaml

# The tiny default on CPU, no downloads: generate the world, then run recipes/tiny/pipeline.yaml (data,
# pretraining, SFT, reward model, PPO, DPO, evaluation, a dry publish) and write outputs/tiny/report.md.
# Rerunning skips the stages that are up to date.
tiny: tiny-data
	$(BIN)/trellis run recipes/tiny/pipeline.yaml

# Two pytest workers with one torch thread each: the tests' models are tiny, so two single-threaded
# processes keep both cores busy where one two-threaded process mostly waits (2x faster on 2 cores).
test: install
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -n 2 --dist loadfile tests

lint: install
	$(BIN)/ruff check src scripts tests
	$(BIN)/ruff format --check src scripts tests
	$(BIN)/lint-imports --no-logo  # the import layers and no cycles (setup.cfg [importlinter])

format: install
	$(BIN)/ruff check --fix src scripts tests
	$(BIN)/ruff format src scripts tests

clean:
	rm -rf $(VENV) outputs data .pytest_cache
