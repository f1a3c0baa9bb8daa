# Leukoscope: `make demo` (set up + train/evaluate/predict on real data), `make test` (set up + tests).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
DATA ?= ../shared/data/aria_all
RUN ?= runs/demo
EPOCHS ?= 20

.PHONY: setup demo test browser models benchmark compare cross-lab clean

SHARED ?= ../shared/data

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -e '.[dev]'
	touch $@

demo: setup
	@test -d "$(DATA)" || { echo "demo: data folder $(DATA) not found; set DATA=/path/to/images"; exit 2; }
	$(BIN)/leukoscope train "$(DATA)" --out "$(RUN)" --epochs $(EPOCHS) --force
	$(BIN)/leukoscope evaluate "$(RUN)" "$(DATA)" --out "$(RUN)/evaluate" --force
	find "$(DATA)" -type f \( -iname '*.jpg' -o -iname '*.png' -o -iname '*.bmp' \) | sort | awk 'NR % 400 == 1' > "$(RUN)/demo_images.txt"
	tr '\n' '\0' < "$(RUN)/demo_images.txt" | xargs -0 $(BIN)/leukoscope predict "$(RUN)" --out "$(RUN)/demo_predictions.csv"
	@column -s, -t < "$(RUN)/demo_predictions.csv" | cut -c1-160
	@echo "report: $(RUN)/report.html"

test: setup browser
	$(BIN)/python -m pytest -q --durations=10

# The browser test drives Debian's Chromium (no browser download); installed here when run as root.
browser:
	@test -x /usr/bin/chromium || { [ "$$(id -u)" = 0 ] && (DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium >/dev/null 2>&1 || (apt-get update -q >/dev/null 2>&1 && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium >/dev/null 2>&1)); } || echo "chromium not installed: the browser test will be skipped"

# Train and bundle the shipped models (about 30 minutes on 2 CPU cores; blast fine-tunes the new wbc), each on the split
# it was bundled with (configs/NAME.splits.csv). They predict without TTA by default (--tta flip or --tta dihedral to turn it on).
# wbc trains on PBC plus BCCD, linked into one folder (runs/data/wbc) by tools/make_wbc_data.py.
models: setup
	mkdir -p runs/aria-all runs/pbc runs/blast runs/wbc
	cp configs/aria-all.splits.csv runs/aria-all/splits.csv
	$(BIN)/leukoscope train $(SHARED)/aria_all --out runs/aria-all --config configs/aria-all.yaml --force
	$(BIN)/python tools/bundle_model.py runs/aria-all --name aria-all --data $(SHARED)/aria_all
	cp configs/pbc.splits.csv runs/pbc/splits.csv
	$(BIN)/leukoscope train $(SHARED)/pbc --out runs/pbc --config configs/pbc.yaml --force
	$(BIN)/python tools/bundle_model.py runs/pbc --name pbc --data $(SHARED)/pbc
	$(BIN)/python tools/make_wbc_data.py --shared $(SHARED) --out runs/data/wbc
	cp configs/wbc.splits.csv runs/wbc/splits.csv
	$(BIN)/leukoscope train runs/data/wbc --out runs/wbc --config configs/wbc.yaml --force
	$(BIN)/python tools/bundle_model.py runs/wbc --name wbc --data runs/data/wbc
	cp configs/blast.splits.csv runs/blast/splits.csv
	$(BIN)/leukoscope train $(SHARED)/all_idb2 --out runs/blast --config configs/blast.yaml --force
	$(BIN)/python tools/bundle_model.py runs/blast --name blast --data $(SHARED)/all_idb2

# Speed, memory, robustness and service load (about 15 minutes); the CNN-vs-classical comparison
# needs the runs of `make models` (about 15 minutes more). Each writes its block of docs/benchmarks.md.
benchmark: setup
	$(BIN)/python benchmarks/benchmark.py --model pbc --small 64 --large 8192 --reference-large 512 --repeats 3
	$(BIN)/python benchmarks/benchmark.py --model aria-all --small 64 --large 8192 --reference-large 512 --repeats 3
	$(BIN)/python benchmarks/benchmark.py --model wbc --data $(SHARED)/pbc --small 64 --large 8192 --reference-large 512 --repeats 3
	$(BIN)/python benchmarks/count_speed.py --model wbc
	$(BIN)/python benchmarks/int8.py --model pbc
	$(BIN)/python tools/make_wbc_data.py --shared $(SHARED) --out runs/data/wbc
	$(BIN)/python benchmarks/int8.py --model wbc --data runs/data/wbc
	$(BIN)/python benchmarks/robustness.py --model pbc
	$(BIN)/python benchmarks/tta.py
	$(BIN)/python benchmarks/load_test.py --model pbc --requests 400

# Leave-one-lab-out white-cell table (PBC -> BCCD, PBC + part of BCCD -> the rest): six trainings, about 25 minutes.
cross-lab: setup
	$(BIN)/python benchmarks/cross_lab.py --epochs 12

compare: setup
	$(BIN)/python benchmarks/classical.py --dataset pbc --cnn-run runs/pbc
	$(BIN)/python benchmarks/classical.py --dataset aria_all --cnn-run runs/aria-all

clean:
	rm -rf $(VENV) runs build src/*.egg-info
