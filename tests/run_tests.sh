#!/usr/bin/env bash
# Set up and run the tests: unit and property tests, the Snakemake lint, and a `smoke` pipeline run
# against the offline data mirror (ESPARSE_DATA_MIRROR, default ../shared/data). Tests marked `slow`
# (the report rules end to end) run with: bash tests/run_tests.sh -m slow
# The real-SLURM integration test is separate: sudo bash tests/slurm_integration.sh
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
source workflow/setup_env.sh
export ESPARSE_DATA_MIRROR="${ESPARSE_DATA_MIRROR:-$(cd "$repo/.." && pwd)/shared/data}"
if [ "$#" -eq 0 ]; then
    set -- -m "not slow"
fi
python -m pytest tests -q -p no:cacheprovider "$@"
