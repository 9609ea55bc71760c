#!/usr/bin/env bash
# The reference interpreter for the equivalence tests (tests/reference/): torch on CPU, transformers,
# open_clip and open-flamingo, kept out of .venv. The tests build random-weight reference models with
# it; nothing is downloaded from a model hub.
#   bash launch/reference_env.sh            (creates .venv-ref; REF_VENV=path to put it elsewhere)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
REF="${REF_VENV:-.venv-ref}"
PYTHON="${PYTHON:-python3}"
if [[ ! -x "${REF}/bin/python" ]]; then
  "${PYTHON}" -m venv "${REF}"
fi
# torch's CPU build where the machine offers one (a local wheel folder); PyPI's default pulls CUDA.
"${REF}/bin/pip" install -q -r launch/reference-requirements.txt
# Without their dependencies: open-flamingo pins old releases, and open_clip pulls torchvision,
# whose PyPI build needs CUDA torch. The modules the tests use need only torch, einops and numpy.
"${REF}/bin/pip" install -q --no-deps open-flamingo==2.0.1 open_clip_torch==3.3.0
"${REF}/bin/pip" uninstall -q -y torchvision 2>/dev/null || true
"${REF}/bin/python" -c "import torch, transformers; print('reference env: torch', torch.__version__, 'transformers', transformers.__version__)"
