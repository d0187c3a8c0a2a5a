# Shortcuts; scripts/test is what CI runs.
.PHONY: build debug test lint bench demo

build:
	python3 -m pip install -q -e .

debug:
	FASTLB_DEBUG=1 python3 -m pip install -q -e .

test:
	scripts/test

lint:
	python3 -m ruff check src tests bench

bench:
	scripts/bench

demo: build
	python3 -m fastlb demo
