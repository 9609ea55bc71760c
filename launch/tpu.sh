#!/usr/bin/env bash
# Cloud TPU VM launcher for flamingo_jax: create | setup | run | logs | stop | delete.
#
# Usage:
#   launch/tpu.sh [options] COMMAND [-- extra train flags]
#
# Commands (every remote command runs on all workers: --worker=all):
#   create   create the TPU VM (gcloud compute tpus tpu-vm create)
#   setup    copy the code, create a venv and install the package with jax[tpu] (once: marker file)
#   run      copy the code, kill stale processes holding the TPU, start
#            `python -m flamingo_jax.train --config=... --workdir=... [extra flags]` with nohup,
#            one log file per worker (~/flamingo_logs/train-<hostname>.log)
#   logs     print the tail of the workers' logs (--follow: keep following one worker)
#   stop     SIGTERM the job (it saves a checkpoint and exits), SIGKILL after a grace period
#   delete   delete the TPU VM
#
# Options (each also read from the environment variable in brackets):
#   --name NAME          [TPU_NAME]          TPU VM name
#   --zone ZONE          [ZONE]              e.g. us-central2-b
#   --accelerator TYPE   [ACCELERATOR_TYPE]  e.g. v4-32, v5litepod-16 (create only)
#   --version VERSION    [RUNTIME_VERSION]   TPU software version (create only; a default is picked
#                                            from the accelerator type)
#   --project PROJECT    [PROJECT]           GCP project (default: gcloud's configured project)
#   --config SPEC        [CONFIG]            e.g. configs/flamingo.py:size=3b (run only)
#   --workdir PATH       [WORKDIR]           e.g. gs://my-bucket/runs/flamingo-3b (run only)
#   --worker N           [WORKER]            worker(s) for `logs` (default all)
#   --lines N            [LOG_LINES]         lines of log for `logs` (default 100)
#   --python BIN         [REMOTE_PYTHON]     Python on the workers for the venv (default python3.11;
#                                            installed with apt: jax needs >= 3.11)
#   --grace SECONDS      [STOP_GRACE]        seconds `stop` waits before SIGKILL (default 300)
#   --spot                                   create a Spot (preemptible) TPU
#   --follow                                 `logs`: follow (tail -f)
#   --dry-run                                print every command instead of running it
# Everything after `--` is passed to the training command unchanged.
#
# Multi-host initialisation happens in Python: the job is started with FLAMINGO_DISTRIBUTED=1 and
# calls jax.distributed.initialize(), which auto-detects the TPU VM workers.
set -euo pipefail

readonly REMOTE_CODE='flamingo_jax'                 # relative to the remote home directory
readonly REMOTE_VENV='flamingo_venv'
readonly REMOTE_LOGS='flamingo_logs'
readonly MARKER="${REMOTE_VENV}/.flamingo_installed"
readonly TARBALL_NAME='flamingo_jax_code.tgz'
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
readonly REPO_ROOT

TPU_NAME="${TPU_NAME:-}"
ZONE="${ZONE:-}"
ACCELERATOR_TYPE="${ACCELERATOR_TYPE:-}"
RUNTIME_VERSION="${RUNTIME_VERSION:-}"
PROJECT="${PROJECT:-}"
CONFIG="${CONFIG:-}"
WORKDIR="${WORKDIR:-}"
WORKER="${WORKER:-all}"
LOG_LINES="${LOG_LINES:-100}"
REMOTE_PYTHON="${REMOTE_PYTHON:-python3.11}"
STOP_GRACE="${STOP_GRACE:-300}"
SPOT=0
FOLLOW=0
DRY_RUN=0
COMMAND=''
TRAIN_ARGS=()

die() {
  echo "tpu.sh: error: $*" >&2
  exit 2
}

usage() {
  sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed -e '$d' -e 's/^# \{0,1\}//'
}

# Prints one command with each argument quoted only when needed, so it can be pasted into a shell.
print_cmd() {
  local out='' arg
  for arg in "$@"; do
    if [[ "${arg}" =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then
      out+="${arg} "
    else
      out+="'${arg//\'/\'\\\'\'}' "
    fi
  done
  echo "${out% }"
}

# Runs a command, or prints it under --dry-run.
run_cmd() {
  if (( DRY_RUN )); then
    print_cmd "$@"
  else
    "$@"
  fi
}

require() {
  local var="$1" flag="$2"
  [[ -n "${!var}" ]] || die "set ${flag} or the environment variable ${var}."
}

default_runtime_version() {
  case "${ACCELERATOR_TYPE}" in
    v2-*|v3-*|v4-*) echo 'tpu-ubuntu2204-base' ;;
    v5litepod-*|v5e-*) echo 'v2-alpha-tpuv5-lite' ;;
    v5p-*) echo 'v2-alpha-tpuv5' ;;
    v6e-*) echo 'v2-alpha-tpuv6e' ;;
    *) die "no default runtime version for accelerator '${ACCELERATOR_TYPE}'; set --version." ;;
  esac
}

location_flags() {
  LOCATION=("--zone=${ZONE}")
  if [[ -n "${PROJECT}" ]]; then
    LOCATION+=("--project=${PROJECT}")
  fi
}

# Runs a one-line shell script on every worker.
ssh_all() {
  run_cmd gcloud compute tpus tpu-vm ssh "${TPU_NAME}" "${LOCATION[@]}" --worker=all \
    --command="$1"
}

# Copies the working tree (without venvs, git metadata, outputs, weights: keep those on gs://) to
# ~/flamingo_jax on every worker.
copy_code() {
  local tarball="${TMPDIR:-/tmp}/${TARBALL_NAME}"
  run_cmd tar -czf "${tarball}" -C "${REPO_ROOT}" --exclude=./.git --exclude=./.venv \
    --exclude=__pycache__ --exclude='*.egg-info' --exclude=./runs --exclude='./workdir*' \
    --exclude='*.gguf' --exclude='*.safetensors' --exclude='*.npz' .
  run_cmd gcloud compute tpus tpu-vm scp "${tarball}" "${TPU_NAME}:${TARBALL_NAME}" \
    "${LOCATION[@]}" --worker=all
  ssh_all "mkdir -p \$HOME/${REMOTE_CODE} && tar -xzf \$HOME/${TARBALL_NAME} -C \$HOME/${REMOTE_CODE} && rm \$HOME/${TARBALL_NAME}"
}

# Kills whatever still holds the TPU chips (a crashed or stale job), and libtpu's lock file.
# Single-quoted on purpose: it expands on the workers, not here.
# shellcheck disable=SC2016
readonly KILL_STALE='pids=$(sudo lsof -t /dev/accel* /dev/vfio/* 2>/dev/null | sort -u || true); if [ -n "$pids" ]; then echo "killing stale TPU processes: $pids"; sudo kill -9 $pids; sleep 2; fi; sudo rm -f /tmp/libtpu_lockfile'

cmd_create() {
  require ACCELERATOR_TYPE --accelerator
  if [[ -z "${RUNTIME_VERSION}" ]]; then
    RUNTIME_VERSION="$(default_runtime_version)"
  fi
  local args=(gcloud compute tpus tpu-vm create "${TPU_NAME}" "${LOCATION[@]}"
              "--accelerator-type=${ACCELERATOR_TYPE}" "--version=${RUNTIME_VERSION}")
  if (( SPOT )); then
    args+=(--spot)
  fi
  run_cmd "${args[@]}"
}

cmd_setup() {
  copy_code
  local venv="\$HOME/${REMOTE_VENV}"
  ssh_all "if [ -f \$HOME/${MARKER} ]; then echo 'already set up'; exit 0; fi; set -e; sudo apt-get -qq update; sudo apt-get -qq install -y ${REMOTE_PYTHON} ${REMOTE_PYTHON}-venv; ${REMOTE_PYTHON} -m venv ${venv}; ${venv}/bin/pip install -q -U pip; ${venv}/bin/pip install -q -e \"\$HOME/${REMOTE_CODE}[tpu]\"; touch \$HOME/${MARKER}; echo \"set up \$(hostname)\""
}

cmd_run() {
  require CONFIG --config
  require WORKDIR --workdir
  copy_code
  local train=(python -m flamingo_jax.train "--config=${CONFIG}" "--workdir=${WORKDIR}"
               "${TRAIN_ARGS[@]}")
  local quoted
  quoted="$(print_cmd "${train[@]}")"
  local logs="\$HOME/${REMOTE_LOGS}"
  local log="${logs}/train-\$(hostname).log"
  ssh_all "${KILL_STALE}; set -e; test -f \$HOME/${MARKER} || { echo 'run setup first' >&2; exit 1; }; mkdir -p ${logs}; cd \$HOME/${REMOTE_CODE}; . \$HOME/${REMOTE_VENV}/bin/activate; FLAMINGO_DISTRIBUTED=1 nohup ${quoted} > ${log} 2>&1 < /dev/null & echo \$! > ${logs}/train.pid; echo \"started pid \$(cat ${logs}/train.pid) on \$(hostname), log ${log}\""
}

cmd_logs() {
  local tail_cmd="tail -v -n ${LOG_LINES}"
  if (( FOLLOW )); then
    [[ "${WORKER}" != 'all' ]] || die '--follow needs one worker: add --worker=0 (for example).'
    tail_cmd="tail -v -n ${LOG_LINES} -f"
  fi
  run_cmd gcloud compute tpus tpu-vm ssh "${TPU_NAME}" "${LOCATION[@]}" "--worker=${WORKER}" \
    --command="${tail_cmd} \$HOME/${REMOTE_LOGS}/train-*.log"
}

cmd_stop() {
  ssh_all "pidfile=\$HOME/${REMOTE_LOGS}/train.pid; if [ -f \$pidfile ] && kill -0 \$(cat \$pidfile) 2>/dev/null; then pid=\$(cat \$pidfile); kill -TERM \$pid; for _ in \$(seq ${STOP_GRACE}); do kill -0 \$pid 2>/dev/null || break; sleep 1; done; kill -9 \$pid 2>/dev/null || true; fi; rm -f \$pidfile; ${KILL_STALE}"
}

cmd_delete() {
  run_cmd gcloud compute tpus tpu-vm delete "${TPU_NAME}" "${LOCATION[@]}" --quiet
}

parse_args() {
  while (( $# )); do
    case "$1" in
      --name) TPU_NAME="${2:?--name needs a value}"; shift 2 ;;
      --name=*) TPU_NAME="${1#*=}"; shift ;;
      --zone) ZONE="${2:?--zone needs a value}"; shift 2 ;;
      --zone=*) ZONE="${1#*=}"; shift ;;
      --accelerator) ACCELERATOR_TYPE="${2:?--accelerator needs a value}"; shift 2 ;;
      --accelerator=*) ACCELERATOR_TYPE="${1#*=}"; shift ;;
      --version) RUNTIME_VERSION="${2:?--version needs a value}"; shift 2 ;;
      --version=*) RUNTIME_VERSION="${1#*=}"; shift ;;
      --project) PROJECT="${2:?--project needs a value}"; shift 2 ;;
      --project=*) PROJECT="${1#*=}"; shift ;;
      --config) CONFIG="${2:?--config needs a value}"; shift 2 ;;
      --config=*) CONFIG="${1#*=}"; shift ;;
      --workdir) WORKDIR="${2:?--workdir needs a value}"; shift 2 ;;
      --workdir=*) WORKDIR="${1#*=}"; shift ;;
      --worker) WORKER="${2:?--worker needs a value}"; shift 2 ;;
      --worker=*) WORKER="${1#*=}"; shift ;;
      --lines) LOG_LINES="${2:?--lines needs a value}"; shift 2 ;;
      --lines=*) LOG_LINES="${1#*=}"; shift ;;
      --python) REMOTE_PYTHON="${2:?--python needs a value}"; shift 2 ;;
      --python=*) REMOTE_PYTHON="${1#*=}"; shift ;;
      --grace) STOP_GRACE="${2:?--grace needs a value}"; shift 2 ;;
      --grace=*) STOP_GRACE="${1#*=}"; shift ;;
      --spot) SPOT=1; shift ;;
      --follow) FOLLOW=1; shift ;;
      --dry-run) DRY_RUN=1; shift ;;
      -h|--help) usage; exit 0 ;;
      --) shift; TRAIN_ARGS=("$@"); break ;;
      create|setup|run|logs|stop|delete)
        [[ -z "${COMMAND}" ]] || die "two commands given: ${COMMAND} and $1."
        COMMAND="$1"; shift ;;
      *) die "unknown argument '$1' (see --help)." ;;
    esac
  done
}

main() {
  parse_args "$@"
  [[ -n "${COMMAND}" ]] || { usage >&2; die 'no command: create | setup | run | logs | stop | delete.'; }
  [[ "${LOG_LINES}" =~ ^[0-9]+$ ]] || die "--lines must be a number, got '${LOG_LINES}'."
  [[ "${REMOTE_PYTHON}" =~ ^python3(\.[0-9]+)?$ ]] || die "--python must look like python3.11."
  [[ "${STOP_GRACE}" =~ ^[0-9]+$ ]] || die "--grace must be a number, got '${STOP_GRACE}'."
  [[ "${WORKER}" =~ ^(all|[0-9]+(,[0-9]+)*)$ ]] || die "--worker must be all or numbers, got '${WORKER}'."
  if (( ${#TRAIN_ARGS[@]} )) && [[ "${COMMAND}" != 'run' ]]; then
    die "arguments after -- are only for run."
  fi
  require TPU_NAME --name
  require ZONE --zone
  location_flags
  "cmd_${COMMAND}"
}

main "$@"
