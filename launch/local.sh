#!/usr/bin/env bash
# The main job on one machine (CPU by default): stage 1 (contrastive NFNet on easy-VQA captions),
# stage 2 (Flamingo over the real frozen SmolLM2-135M on the easy-VQA mixture), then few-shot evaluation.
#   bash launch/local.sh [WORKDIR]          (default runs/main)
# Extra flags for every stage can be given in FLAGS_CONTRASTIVE, FLAGS_FLAMINGO, FLAGS_EVAL.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
WORKDIR="${1:-runs/main}"
PY="${PYTHON:-.venv/bin/python}"
export TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-2}"
mkdir -p "${WORKDIR}"

echo "== stage 1: contrastive vision pretraining -> ${WORKDIR}/contrastive"
# shellcheck disable=SC2086
"${PY}" -m flamingo_jax.train --config configs/contrastive.py:size=smollm2 \
  --workdir "${WORKDIR}/contrastive" --config.data.data_dir="${WORKDIR}/tfds" ${FLAGS_CONTRASTIVE:-}

echo "== stage 2: Flamingo training -> ${WORKDIR}/flamingo"
# shellcheck disable=SC2086
"${PY}" -m flamingo_jax.train --config configs/main_job.py \
  --workdir "${WORKDIR}/flamingo" --config.data.data_dir="${WORKDIR}/tfds" \
  --config.init_from.vision="${WORKDIR}/contrastive" ${FLAGS_FLAMINGO:-}

echo "== evaluation -> ${WORKDIR}/flamingo/eval"
# shellcheck disable=SC2086
"${PY}" -m flamingo_jax.evaluate --config configs/fewshot_eval.py:quick=True \
  --workdir "${WORKDIR}/flamingo" --config.data_dir="${WORKDIR}/tfds" ${FLAGS_EVAL:-}
echo "== done: ${WORKDIR}/flamingo/eval/results.json (the full 0/4/8/16-shot, random + RICES sweep:"
echo "   ${PY} -m flamingo_jax.evaluate --config configs/fewshot_eval.py:seeds=1 --workdir ${WORKDIR}/flamingo --config.data_dir=${WORKDIR}/tfds)"
