#!/usr/bin/env bash
# The whole test suite; `make test` calls this after set-up.
set -euo pipefail
cd "$(dirname "$0")/.."
exec .venv/bin/python -m pytest -q -p no:cacheprovider "$@" tests
