# Shortcuts; scripts/test is what CI runs.  Never the system Python (Debian refuses pip there, PEP 668):
# build installs the checkout (editable, with the test tools) into the venv the scripts use,
# $FASTLB_VENV or .venv; the other targets run the fastlb scripts/lib/find-fastlb.sh finds (it says
# which on stderr).
.PHONY: build debug test lint bench demo

FIND = . scripts/lib/find-fastlb.sh && fastlb_find make

build:
	. scripts/lib/find-fastlb.sh && FASTLB_EDITABLE=1 FASTLB_EXTRAS=test scripts/venv "$$(fastlb_venv_dir)"

debug:
	. scripts/lib/find-fastlb.sh && FASTLB_DEBUG=1 FASTLB_EDITABLE=1 FASTLB_EXTRAS=test scripts/venv "$$(fastlb_venv_dir)"

test:
	scripts/test

lint:
	$(FIND) && "$$FASTLB_PYTHON" -m ruff check src tests bench && "$$FASTLB_PYTHON" -m ruff format --check src tests bench

bench:
	scripts/bench

demo: build
	$(FIND) && "$$FASTLB_BIN" demo
