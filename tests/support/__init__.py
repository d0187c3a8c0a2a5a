"""Harness for fastlb's end-to-end tests: backend servers, the `fastlb serve` process, socket helpers."""
