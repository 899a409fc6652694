#!/usr/bin/env bash
# Install what is missing, then run the whole test suite (CPU, gloo). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck disable=SC1091
. scripts/env.sh
# tests/test_slurm.py starts a real one-node Slurm: install Debian's packages when they are missing
# and apt-get can (as root); otherwise that test skips, saying why.
if ! PATH="$PATH:/usr/sbin:/sbin" command -v slurmctld >/dev/null && command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
    echo "[env] installing slurmctld slurmd slurm-client munge (for tests/test_slurm.py)"
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        slurmctld slurmd slurm-client munge; } >/dev/null 2>&1 || echo "[env] Slurm could not be installed"
fi
exec python -m pytest -q "$@"
