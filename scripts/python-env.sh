#!/usr/bin/env bash
# Creates (once) the Python venv with the real clients the end-to-end tests drive — the Feast
# SDK, tritonclient — pinned in scripts/requirements-clients.txt, and prints its python.
# Usage: scripts/python-env.sh [VENV_DIR]   (default: target/pyenv)
# Re-running is cheap: a venv whose stamp matches the requirements file is kept.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
venv="${1:-$root/target/pyenv}"
req="$root/scripts/requirements-clients.txt"
stamp="$venv/.requirements.sha256"
want="$(sha256sum "$req" | cut -d' ' -f1)"
mkdir -p "$(dirname "$venv")"
exec 9>"$venv.lock"
flock 9
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  rm -rf "$venv"
  python3 -m venv "$venv" >&2
  "$venv/bin/pip" install --quiet --disable-pip-version-check -r "$req" >&2
  echo "$want" > "$stamp"
fi
echo "$venv/bin/python"
