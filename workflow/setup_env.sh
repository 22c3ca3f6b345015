#!/usr/bin/env bash
# Create (or reuse) the project's virtual environment in .venv and install the pinned CPU stack.
# Usage: source workflow/setup_env.sh   (sets up and activates .venv)
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${ESPARSE_VENV:-$repo/.venv}"
if [ ! -x "$venv/bin/python" ]; then
    python3 -m venv "$venv"
fi
# shellcheck disable=SC1091
. "$venv/bin/activate"
stamp="$venv/.esparse-installed"
if [ ! -f "$stamp" ] || [ "$repo/envs/requirements-cpu.txt" -nt "$stamp" ] || [ "$repo/pyproject.toml" -nt "$stamp" ]; then
    python -m pip install --quiet --upgrade pip
    # torch first and alone, so that a CPU build is taken where one is available locally.
    python -m pip install --quiet "torch==2.13.0"
    python -m pip install --quiet -r "$repo/envs/requirements-cpu.txt"
    python -m pip install --quiet --no-deps -e "$repo"
    touch "$stamp"
fi
set +euo pipefail
