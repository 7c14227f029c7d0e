# make test : create .venv, install the project with its test extras, lint, run the tests
# make demo : the end-to-end demo (shards from real emoji data -> 2-process DDP training -> evaluation)
# make study: the ablation study (CLIP vs DiffCLIP vs DiffCLIP* vs DiffCLIP†, 3 seeds) of studies/emoji_clipart.json
# make constraints: rewrite constraints.txt (the exact versions CI tests) from a .venv made by `make venv`
VENV ?= .venv
PY := $(VENV)/bin/python
# torch/torchvision pinned to the builds this platform serves from disk
TORCH := torch==2.14.1 torchvision==0.29.1
# Debian's real datasets the tests read (make test-data)
TEST_DEBS := dataset-fashion-mnist openclipart-png openclipart-svg
APT_INSTALL := DEBIAN_FRONTEND=noninteractive apt-get install -y -q $(TEST_DEBS) >/dev/null 2>&1

.PHONY: venv constraints test test-data lint demo study bench clean

venv: $(VENV)/.installed $(VENV)/img2dataset/.installed

# the project with its test extras, at the versions of constraints.txt (pyproject.toml declares only ranges)
$(VENV)/.installed: pyproject.toml constraints.txt
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -c constraints.txt -e '.[test]' $(TORCH)
	touch $@

# img2dataset, run by tests/test_img2dataset.py, in a venv of its own: it pins webdataset<0.3 and pandas<3
$(VENV)/img2dataset/.installed: constraints-img2dataset.txt
	python3 -m venv $(VENV)/img2dataset
	$(VENV)/img2dataset/bin/pip install -q -c constraints-img2dataset.txt img2dataset
	touch $@

# after adding or upgrading a dependency (pyproject.toml, then `.venv/bin/pip install` it), to pin what .venv holds
constraints: venv
	{ echo "# The exact versions CI tests: make venv installs with -c constraints.txt; make constraints rewrites it."; \
	  $(PY) -m pip freeze --exclude-editable; } > constraints.txt
	{ sed -n '1,2p' constraints-img2dataset.txt; $(VENV)/img2dataset/bin/pip freeze; } > constraints-img2dataset.txt.new
	mv constraints-img2dataset.txt.new constraints-img2dataset.txt
	touch $(VENV)/.installed $(VENV)/img2dataset/.installed

lint: venv
	$(VENV)/bin/ruff check diffclip training eval bench tests scripts

# the real data the tests read: the emoji sets (npm registry), and Debian's Fashion-MNIST and Openclipart
# (installed when missing and apt-get can run as root; Fashion-MNIST is required, the rest optional)
test-data:
	-OPENCLIPART=0 scripts/get_demo_data.sh data/sources
	@test -d /usr/share/datasets/fashion-mnist -a -d /usr/share/openclipart || { [ "$$(id -u)" = 0 ] && \
	  { $(APT_INSTALL) || { apt-get update -qq >/dev/null 2>&1; $(APT_INSTALL); }; }; } \
	  || echo "make test-data: could not apt-get install $(TEST_DEBS) (Fashion-MNIST tests will fail)" >&2

test: lint test-data
	$(PY) -m pytest -q -n 2 tests

demo: venv
	scripts/demo.sh

# needs Debian's Openclipart (apt-get install openclipart-png openclipart-svg); rerunning continues where it stopped
study: venv
	@test -d /usr/share/openclipart || { echo "make study: needs Debian's Openclipart: apt-get install openclipart-png openclipart-svg" >&2; exit 1; }
	OPENCLIPART=0 scripts/get_demo_data.sh data/sources
	test -f data/mmvp_emoji/Questions.csv || $(PY) scripts/make_mmvp_emoji.py data/sources/emoji-datasource-twitter data/mmvp_emoji
	$(PY) training/study.py studies/emoji_clipart.json --jobs 2

bench: venv
	$(PY) bench/attention.py

clean:
	rm -rf $(VENV) build *.egg-info
