# Sourced by scripts/demo and scripts/test: create or refresh the local virtual environment
# (.venv) with the pinned CPU test dependencies when it is missing or requirements changed.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${MTE_VENV:-$ROOT/.venv}"
PY="${MTE_PYTHON:-python3}"
REQ="$ROOT/requirements/test.txt"
STAMP="$VENV/.mte-stamp"
want="$(cat "$REQ" "$ROOT/pyproject.toml" | sha256sum | cut -d' ' -f1)"
if [ ! -x "$VENV/bin/python" ] || [ "$(cat "$STAMP" 2>/dev/null)" != "$want" ]; then
  echo "[setup] preparing $VENV (pinned CPU dependencies, first run takes about a minute)" >&2
  "$PY" -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip >/dev/null
  # torch first, pinned, so that no later resolution can pick a CUDA build.
  "$VENV/bin/python" -m pip install -q "$(grep '^torch==' "$REQ")"
  "$VENV/bin/python" -m pip install -q -r "$REQ"
  "$VENV/bin/python" -m pip install -q --no-deps -e "$ROOT"
  echo "$want" > "$STAMP"
fi
export PATH="$VENV/bin:$PATH"
cd "$ROOT"
