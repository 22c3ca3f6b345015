#!/usr/bin/env bash
# Set up and run every test: unit and property tests, the Snakemake lint, and a `smoke` pipeline run
# against the offline data mirror (ESPARSE_DATA_MIRROR, default ../shared/data).
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
source workflow/setup_env.sh
export ESPARSE_DATA_MIRROR="${ESPARSE_DATA_MIRROR:-$(cd "$repo/.." && pwd)/shared/data}"
python -m pytest tests -q -p no:cacheprovider "$@"
