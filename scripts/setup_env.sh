#!/bin/bash
# Usage: source scripts/setup_env.sh   (creates/updates .venv and activates it)
# ENKI_TF=gpu installs tensorflow[and-cuda] instead of tensorflow-cpu.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python="${PYTHON:-python3}"
if [ ! -x "$root/.venv/bin/python" ]; then
    "$python" -m venv "$root/.venv"
fi
# shellcheck disable=SC1091
source "$root/.venv/bin/activate"
extra="${ENKI_TF:-cpu}"
stamp="$root/.venv/.setup-stamp"
want="$(sha1sum "$root/pyproject.toml" | cut -c1-40)-$extra"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    log="$root/.venv/setup.log"
    if ! { python -m pip install -q --upgrade pip && python -m pip install -q -e "$root[$extra,dev]"; } \
            >"$log" 2>&1; then
        cat "$log" >&2
        echo "setup failed; the pip log above is also in $log" >&2
        exit 1
    fi
    echo "$want" > "$stamp"
fi
set +euo pipefail
