#!/usr/bin/env bash
# Set up and run the main job: the `default` preset on SmolLM2-135M.
# Data come from the Hugging Face Hub when it is reachable, otherwise from the offline mirror
# (ESPARSE_DATA_MIRROR, default ../shared/data next to this checkout).
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
source workflow/setup_env.sh
mirror="${ESPARSE_DATA_MIRROR:-$repo/../shared/data}"
extra=()
if ! python -c "import urllib.request; urllib.request.urlopen('https://huggingface.co', timeout=5)" 2>/dev/null; then
    echo "Hugging Face Hub unreachable: using the offline data mirror at $mirror"
    extra+=("data_mirror=$mirror")
fi
snakemake --cores "${ESPARSE_CORES:-2}" --config preset="${ESPARSE_PRESET:-default}" "${extra[@]}" "$@"
