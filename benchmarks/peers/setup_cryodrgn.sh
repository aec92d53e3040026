#!/usr/bin/env bash
# cryoDRGN in its own virtual environment, so that its pins never touch the project's.
#   bash benchmarks/peers/setup_cryodrgn.sh [VENV]   (default /work/peers-venv)
# torch is installed first and alone: cryodrgn 4.3.1 asks only for torch>=2, so the pinned CPU
# build (torch==2.13.0, the project's; on this machine a local +cpu wheel) satisfies it and pip
# pulls no CUDA wheels for cryodrgn's sake.
set -euo pipefail
VENV="${1:-/work/peers-venv}"
CRYODRGN_VERSION=4.3.1
if [ -x "$VENV/bin/cryodrgn" ] && "$VENV/bin/cryodrgn" --version 2>/dev/null | grep -q "$CRYODRGN_VERSION"; then
    echo "cryodrgn $CRYODRGN_VERSION already in $VENV"
    exit 0
fi
python3 -m venv "$VENV"
"$VENV/bin/python" -m pip install --quiet --upgrade pip
"$VENV/bin/python" -m pip install --quiet "torch==2.13.0"
"$VENV/bin/python" -m pip install --quiet "cryodrgn==$CRYODRGN_VERSION"
"$VENV/bin/cryodrgn" --version
