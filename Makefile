# Everything a fresh machine needs: `make demo`, `make test`. The CPU wheel of torch is pinned by
# default (an unpinned torch pulls a multi-GB CUDA build); override with `make TORCH=torch==X ...`.
PYTHON ?= python3
TORCH ?= torch==2.13.0
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
TOOLS := $(VENV)/.tools

.PHONY: install demo test lint bench clean

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[dev,plots,tensorboard]"
	touch $(STAMP)

# Open MPI, MPICH, pdsh, OpenSSH and Slurm from Debian's packages, so every runner of the launcher
# (openmpi, mpich, pdsh, ssh, slurm) is tested for real; where they cannot be installed (no apt, not
# root, no network) those tests skip and say why.
DEBS := openmpi-bin mpich pdsh openssh-server openssh-client slurm-wlm
$(TOOLS): $(STAMP)
	@{ command -v mpirun.openmpi && command -v mpirun.mpich && command -v pdsh && [ -x /usr/sbin/sshd ] && command -v ssh && command -v slurmd; } >/dev/null 2>&1 || \
	  { command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ] && \
	  { apt-get install -y -q --no-install-recommends $(DEBS) >/dev/null 2>&1 || \
	    { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q --no-install-recommends $(DEBS) >/dev/null 2>&1; }; }; } || \
	  echo "note: $(DEBS) could not all be installed; the launcher tests that need them will skip"
	touch $(TOOLS)

install: $(STAMP) $(TOOLS)

demo: $(STAMP)
	$(PY) -m shardspeed.launcher --num_procs 2 examples/gpt_demo.py --deepspeed_config examples/ds_config.json --out runs/demo

lint: $(STAMP)
	$(VENV)/bin/ruff check shardspeed tests benchmarks examples
	$(VENV)/bin/lint-imports

test: $(STAMP) $(TOOLS) lint
	$(PY) -m pytest -q -p no:cacheprovider tests

bench: $(STAMP)
	$(PY) benchmarks/run_all.py

clean:
	rm -rf $(VENV) runs build *.egg-info
