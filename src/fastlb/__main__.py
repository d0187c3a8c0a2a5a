"""`python -m fastlb` is the `fastlb` command."""

from fastlb.cli import main

main()
