#!/usr/bin/env bash
# Install what is missing, then run the whole test suite (CPU, gloo). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck disable=SC1091
. scripts/env.sh
exec python -m pytest -q "$@"
