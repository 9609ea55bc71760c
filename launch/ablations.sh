#!/usr/bin/env bash
# The ablation table (docs/ABLATIONS.md): each ablation of configs/ablations.py trained from the main
# job's stage 1 and data, for SEEDS training seeds, each followed by the quick evaluation; then the table.
#   bash launch/ablations.sh [MAIN_WORKDIR] [OUT]          (defaults runs/main, runs/ablations)
#   NAMES="baseline tanh_off" SEEDS="0 1 2" bash launch/ablations.sh
# About 20 minutes per run on the 2-core CPU of the main job; re-running skips finished runs.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
MAIN="${1:-runs/main}"
OUT="${2:-runs/ablations}"
PY="${PYTHON:-.venv/bin/python}"
NAMES="${NAMES:-baseline tanh_off round_robin all_previous_images xattn_every_2 xattn_every_8 p_next_half lm_unfrozen resampler_mlp resampler_transformer}"
SEEDS="${SEEDS:-0 1 2}"
export TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-2}"
if [ ! -d "${MAIN}/contrastive" ] || [ ! -d "${MAIN}/tfds" ]; then
  echo "ablations: ${MAIN} has no contrastive/ or tfds/: run bash launch/local.sh ${MAIN} first" >&2
  exit 1
fi
for name in ${NAMES}; do
  for seed in ${SEEDS}; do
    run="${OUT}/${name}/seed${seed}"
    if [ -f "${run}/eval/results.json" ]; then continue; fi
    echo "== ${name}, seed ${seed} -> ${run}"
    # shellcheck disable=SC2086
    "${PY}" -m flamingo_jax.train --config "configs/ablations.py:name=${name}" --workdir "${run}" \
      --config.data.data_dir="${MAIN}/tfds" --config.init_from.vision="${MAIN}/contrastive" \
      --config.train.seed="${seed}" ${FLAGS_TRAIN:-}
    # shellcheck disable=SC2086
    "${PY}" -m flamingo_jax.evaluate --config configs/fewshot_eval.py:quick=True --workdir "${run}" \
      --config.data_dir="${MAIN}/tfds" ${FLAGS_EVAL:-}
  done
done
"${PY}" -m flamingo_jax.eval.ablation_table "${OUT}"
