#!/bin/sh
# from the repository root, in its venv
python scripts/bench_cli.py --before dc71410 --repeats 9 --out results/bench-cli
