#!/usr/bin/env bash
# Cloud TPU VM launcher for midas_jax: create a slice, set it up, run the trainer on every
# worker, follow its log, stop it (SIGTERM, so the trainer checkpoints), delete the slice.
# Every action is a gcloud command; --dry-run prints them (shell-quoted, one per line) instead.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PROG=launch/tpu.sh
LIBTPU_URL=https://storage.googleapis.com/jax-releases/libtpu_releases.html

usage() {
  cat <<EOF
usage: $PROG [--dry-run] [--name TPU] [--zone ZONE] [--project PROJECT] SUBCOMMAND [FLAGS] [-- ARGS]

Subcommands:
  create    request a TPU slice as a queued resource (resource and node are both named TPU)
              --accelerator-type TYPE   e.g. v4-32, v5litepod-16, v5p-8, v6e-8  [ACCELERATOR_TYPE]
              --runtime-version VER     default per generation: v2-v4 tpu-ubuntu2204-base,
                                        v5e v2-alpha-tpuv5-lite, v5p v2-alpha-tpuv5,
                                        v6e v2-alpha-tpuv6e                     [RUNTIME_VERSION]
              --spot | --best-effort    preemptible capacity (--best-effort uses gcloud alpha)
              --reserved                use the project's reserved capacity
              -- FLAGS                  more gcloud flags, e.g. -- --valid-until-duration=6h
              --gin-file FILE, --gin X=V  the run it is for: run the AOT check (as `check`)
                                        first and refuse if some depth does not fit
              --force                   skip that check
  check     compile every depth of a run for a slice, here, without a TPU (python -m
            midas_jax.aot; needs the tpu extra): per-chip HBM, fit, collectives, est. step time
              --accelerator-type TYPE   the slice, e.g. v5p-256 or v5p:4x4x8  [ACCELERATOR_TYPE]
              --num-slices N            slices over DCN (default 1)
              --gin-file FILE, --gin X=V, -- ARGS   as for run; exit status 3 if some depth
                                        does not fit
  status    describe the queued resource and its node
  setup     on all workers: copy the code, make a venv, pip install -e . and jax[tpu]
              (default: a git archive of local HEAD, copied with scp; uncommitted changes are not)
              --repo URL [--ref REF]    git fetch URL at REF (default HEAD) on the workers instead
                                        [REPO, REF]
              --python PY               interpreter for the venv (default python3.11; apt-installed
                                        when missing)                           [REMOTE_PYTHON]
              --jax-spec SPEC           default 'jax[tpu]'                      [JAX_SPEC]
  run       on all workers, in the background (nohup), logging to <dir>/logs/RUN.log:
              python -m midas_jax.train --gin_file=... --gin.MODEL_DIR=... \\
                --gin.midas_jax.sharding.initialize_distributed.enabled=True [--gin.X=V ...] [ARGS]
              --run-name RUN            names the log, pid file and default MODEL_DIR  [RUN_NAME]
              --gin-file FILE           repeatable, at least one (also --gin_file)
              --gin.X=V | --gin X=V     repeatable, passed on verbatim as --gin.X=V (after the
                                        script's own bindings, so they win)
              --model-dir DIR           default BUCKET/runs/RUN                 [MODEL_DIR]
              --bucket gs://BUCKET                                              [BUCKET]
              --no-distributed          leave jax.distributed.initialize off (single-host slice)
              -- ARGS                   appended to the trainer's command line
            Re-running the same run command after a stop or preemption resumes from the latest
            checkpoint in MODEL_DIR. Refuses to start while RUN is still running on a worker.
            With --accelerator-type TYPE (or ACCELERATOR_TYPE) it first runs the AOT check
            here and refuses if some depth does not fit; --force skips the check.
  logs      tail RUN's log:  --run-name RUN  --worker N (default 0)  --lines N (default 100)
              --no-follow
  stop      SIGTERM RUN on all workers (the trainer saves a checkpoint) and wait for it to exit:
              --run-name RUN  --timeout SECONDS (default 600; 0: do not wait)
  delete    delete the queued resource and its node; asks first unless --yes

Global flags (anywhere before --) and their environment variables:
  --name, --tpu-name TPU  [TPU_NAME]     --zone ZONE [ZONE]     --project PROJECT [PROJECT]
  --remote-dir DIR        [REMOTE_DIR]   code directory on the workers, relative to the home
                                         directory or absolute (default midas_jax)
  --dry-run               print the commands (pasteable, one per line) instead of running them
  -h, --help              this text

Example (docs/tpu.md has the whole walk-through):
  export TPU_NAME=midas-v4-32 ZONE=us-central2-b PROJECT=my-project
  $PROG create --accelerator-type v4-32 --spot
  $PROG setup
  $PROG run --run-name 1b-prop1 --bucket gs://my-bucket \\
    --gin-file gin/experiments/decoder_1b.gin --gin-file gin/schedules/midas_prop1.gin \\
    --gin.midas_jax.sharding.make_mesh.fsdp=-1 \\
    --gin.SPM_MODEL="'gs://my-bucket/spm32k.model'" \\
    --gin.midas_jax.data.tfds_task.data_dir="'gs://my-bucket/tensorflow_datasets'"
  $PROG logs --run-name 1b-prop1
EOF
}

usage_error() { usage >&2; printf '\n%s: error: %s\n' "$PROG" "$1" >&2; exit 2; }
die() { printf '%s: error: %s\n' "$PROG" "$1" >&2; exit "${2:-1}"; }
warn() { printf '%s: warning: %s\n' "$PROG" "$1" >&2; }

# A missing setting is named together with both ways to give it.
require() {  # VAR FLAG HINT
  [[ -n ${!1:-} ]] || die "$1 is not set: pass $2 $3 or export $1=$3" 2
}

# Shell-quote one word into REPLY so that bash and Python's shlex.split give it back exactly:
# safe words stay bare, others go in single quotes, or in double quotes when they hold a single
# quote and nothing special to double quotes (gin strings: "'gs://b/r'" reads better nested).
q() {
  local sq="'\\''"
  if [[ $1 =~ ^[A-Za-z0-9_@%+=:,./-]+$ ]]; then REPLY=$1
  elif [[ $1 != *\'* ]]; then REPLY="'$1'"
  elif [[ $1 != *[\"\$\`\\!]* ]]; then REPLY="\"$1\""
  else REPLY="'${1//\'/$sq}'"; fi
}

# Quote a command line into REPLY; `--flag=value` keeps the flag bare (`--command='...'`).
qcmd() {
  local out=() a flag
  for a in "$@"; do
    if [[ $a =~ ^(--[A-Za-z0-9_.-]+=)(.*)$ ]]; then flag=${BASH_REMATCH[1]}; q "${BASH_REMATCH[2]}"; REPLY=$flag$REPLY
    else q "$a"; fi
    out+=("$REPLY")
  done
  local IFS=' '
  REPLY=${out[*]}
}

# Print (dry run) or run one command. Running also echoes it to stderr, so what a dry run shows
# is exactly what gets executed.
x() {
  qcmd "$@"
  if ((DRY_RUN)); then printf '%s\n' "$REPLY"; return 0; fi
  printf '+ %s\n' "$REPLY" >&2
  "$@"
}

# The --zone/--project flags every gcloud TPU command gets.
loc() { LOC=(--zone="$ZONE" --project="$PROJECT"); }

ssh_all() {  # PAYLOAD: run a shell command line on every worker at once
  x gcloud compute tpus tpu-vm ssh "$TPU_NAME" "${LOC[@]}" --worker=all --command="$1"
}

need_value() { (($# >= 2)) || usage_error "$1 needs a value"; }

# Default runtime per TPU generation (Cloud TPU "TPU software versions" page, for JAX).
default_runtime() {
  case $1 in
    v2-*|v3-*|v4-*) echo tpu-ubuntu2204-base;;
    v5litepod-*) echo v2-alpha-tpuv5-lite;;
    v5p-*) echo v2-alpha-tpuv5;;
    v6e-*) echo v2-alpha-tpuv6e;;
    *) die "no default runtime version for accelerator type '$1': pass --runtime-version or export RUNTIME_VERSION" 2;;
  esac
}

# The AOT check (python -m midas_jax.aot) of a run for slice TYPE, here: exit status 3 when some
# depth does not fit, which the callers turn into a refusal.
aot_check() {  # TYPE NUM_SLICES ARGS...
  local py=${LOCAL_PYTHON:-$ROOT/.venv/bin/python}
  local cmd=("$py" -m midas_jax.aot --topology="$1" --num_slices="$2" "${@:3}")
  if ((DRY_RUN)); then qcmd "${cmd[@]}"; printf '%s\n' "$REPLY"; return 0; fi
  [[ -x $py ]] || die "no $py for the AOT check: run bash launch/test.sh first (or set LOCAL_PYTHON), or pass --force to skip the check" 2
  (cd "$ROOT" && "${cmd[@]}")
}

# Refuse (exit 3) unless every depth of the run fits on slice TYPE.
require_fit() {  # TYPE ARGS...
  local rc=0
  aot_check "$1" 1 "${@:2}" || rc=$?
  ((rc == 0)) && return 0
  ((rc == 3)) && die "some depth of this run does not fit on a $1 (table above): lower BATCH_SIZE, use --gin.midas_jax.model.ModelConfig.remat=full, or take a larger slice; --force skips the check" 3
  die "the AOT check failed (exit status $rc, above); --force skips it" "$rc"
}

# --gin-file / --gin flags into FILES and BINDS (shared by create, check and run).
gin_flag() {  # FLAG [VALUE]: sets SHIFT to the words used, 0 if FLAG is not a gin flag
  SHIFT=0
  case $1 in
    --gin-file|--gin_file) need_value "$@"; FILES+=("--gin_file=$2"); SHIFT=2;;
    --gin) need_value "$@"; [[ $2 == ?*=* ]] || usage_error "--gin takes NAME=VALUE, got '$2'"
           BINDS+=("--gin.$2"); SHIFT=2;;
    --gin.?*=*) BINDS+=("$1"); SHIFT=1;;
  esac
}

cmd_check() {
  local slices=1 extra=()
  FILES=() BINDS=()
  while (($#)); do
    gin_flag "$@"; ((SHIFT)) && { shift "$SHIFT"; continue; }
    case $1 in
      --accelerator-type) need_value "$@"; ACCELERATOR_TYPE=$2; shift 2;;
      --num-slices) need_value "$@"; slices=$2; shift 2;;
      --) extra=("${@:2}"); break;;
      *) usage_error "unknown check flag: $1";;
    esac
  done
  require ACCELERATOR_TYPE --accelerator-type v5p-256
  ((${#FILES[@]})) || die "no gin file: pass --gin-file gin/experiments/NAME.gin --gin-file gin/schedules/NAME.gin" 2
  aot_check "$ACCELERATOR_TYPE" "$slices" "${FILES[@]}" ${BINDS[@]+"${BINDS[@]}"} ${extra[@]+"${extra[@]}"}
}

cmd_create() {
  local tier="" reserved=0 extra=() force=0
  FILES=() BINDS=()
  while (($#)); do
    gin_flag "$@"; ((SHIFT)) && { shift "$SHIFT"; continue; }
    case $1 in
      --force) force=1; shift;;
      --accelerator-type) need_value "$@"; ACCELERATOR_TYPE=$2; shift 2;;
      --runtime-version) need_value "$@"; RUNTIME_VERSION=$2; shift 2;;
      --spot|--best-effort) [[ -z $tier || $tier == "$1" ]] || usage_error "--spot and --best-effort exclude each other"
                            tier=$1; shift;;
      --reserved) reserved=1; shift;;
      --) extra=("${@:2}"); break;;
      *) usage_error "unknown create flag: $1";;
    esac
  done
  [[ -z $tier || $reserved == 0 ]] || usage_error "--reserved excludes $tier"
  require ACCELERATOR_TYPE --accelerator-type v4-32
  RUNTIME_VERSION=${RUNTIME_VERSION:-$(default_runtime "$ACCELERATOR_TYPE")}
  if ((${#FILES[@]})) && ((!force)); then
    require_fit "$ACCELERATOR_TYPE" "${FILES[@]}" ${BINDS[@]+"${BINDS[@]}"}
  fi
  # --best-effort exists only in the alpha track of queued-resources create.
  local gc=(gcloud); [[ $tier == --best-effort ]] && gc+=(alpha)
  local flags=(--node-id="$TPU_NAME" "${LOC[@]}" --accelerator-type="$ACCELERATOR_TYPE"
               --runtime-version="$RUNTIME_VERSION")
  [[ -n $tier ]] && flags+=("$tier")
  ((reserved)) && flags+=(--reserved)
  x "${gc[@]}" compute tpus queued-resources create "$TPU_NAME" "${flags[@]}" ${extra[@]+"${extra[@]}"}
}

cmd_status() {
  (($# == 0)) || usage_error "unknown status argument: $1"
  x gcloud compute tpus queued-resources describe "$TPU_NAME" "${LOC[@]}"
  # The node exists only once the request is provisioned; its absence is not an error.
  x gcloud compute tpus tpu-vm describe "$TPU_NAME" "${LOC[@]}" \
    || warn "no node $TPU_NAME yet (the queued resource's state says why)"
}

cmd_setup() {
  local repo=${REPO:-} ref=${REF:-} py=${REMOTE_PYTHON:-python3.11} jax=${JAX_SPEC:-jax[tpu]}
  while (($#)); do
    case $1 in
      --repo) need_value "$@"; repo=$2; shift 2;;
      --ref) need_value "$@"; ref=$2; shift 2;;
      --python) need_value "$@"; py=$2; shift 2;;
      --jax-spec) need_value "$@"; jax=$2; shift 2;;
      *) usage_error "unknown setup flag: $1";;
    esac
  done
  if [[ -n $ref && -z $repo ]]; then usage_error "--ref needs --repo"; fi
  ref=${ref:-HEAD}
  local d; q "$REMOTE_DIR"; d=$REPLY
  local src  # bring the code into $d, keeping .venv and logs/ from an earlier setup
  if [[ -n $repo ]]; then
    q "$repo"; local qr=$REPLY; q "$ref"; local qf=$REPLY
    src="mkdir -p $d && { [ -d $d/.git ] || git -C $d init -q; }"
    src+=" && git -C $d fetch -q --depth=1 $qr $qf && git -C $d checkout -q --force FETCH_HEAD"
    src+=" && git -C $d clean -q -f -d -e /logs"
  else
    local tarball=${TMPDIR:-/tmp}/midas_jax-$TPU_NAME.tar.gz
    if ((!DRY_RUN)) && ! git -C "$ROOT" rev-parse -q --verify HEAD >/dev/null 2>&1; then
      die "$ROOT is not a git checkout with a commit: pass --repo URL to fetch the code instead"
    fi
    if command -v git >/dev/null && [[ -n $(git -C "$ROOT" status --porcelain --untracked-files=no 2>/dev/null) ]]; then
      warn "uncommitted changes in $ROOT are not copied (setup copies HEAD)"
    fi
    x git -C "$ROOT" archive --format=tar.gz -o "$tarball" HEAD
    x gcloud compute tpus tpu-vm scp "$tarball" "$TPU_NAME:midas_jax-src.tar.gz" "${LOC[@]}" --worker=all
    src="mkdir -p $d && find $d -mindepth 1 -maxdepth 1 ! -name .venv ! -name logs -exec rm -rf {} +"
    src+=" && tar -xzf midas_jax-src.tar.gz -C $d && rm -f midas_jax-src.tar.gz"
  fi
  q "$py"; local qp=$REPLY; q "$py-venv"; local qv=$REPLY; q "$jax"; local qj=$REPLY
  # TPU VM images ship Ubuntu 22.04's python3.10; the package needs >= 3.11. The dpkg lock
  # timeout covers unattended-upgrades, which holds the lock for a while after boot.
  local apt="sudo apt-get -q -o DPkg::Lock::Timeout=600"
  local pip=".venv/bin/python -m pip install -q"
  ssh_all "set -e; $src; cd $d; command -v $qp >/dev/null || { $apt update && $apt install -y $qp $qv; }; \
[ -x .venv/bin/python ] || $qp -m venv .venv; $pip -U pip; $pip -e .; $pip -U $qj -f $LIBTPU_URL; \
.venv/bin/python -c 'import jax, midas_jax; print(\"midas_jax ready, jax\", jax.__version__)'"
}

valid_run_name() {
  [[ $RUN_NAME =~ ^[A-Za-z0-9._-]+$ ]] || die "run name '$RUN_NAME' may only hold letters, digits, '.', '_' and '-'" 2
}

cmd_run() {
  local extra=() distributed=1 force=0
  FILES=() BINDS=()
  while (($#)); do
    gin_flag "$@"; ((SHIFT)) && { shift "$SHIFT"; continue; }
    case $1 in
      --run-name) need_value "$@"; RUN_NAME=$2; shift 2;;
      --accelerator-type) need_value "$@"; ACCELERATOR_TYPE=$2; shift 2;;
      --force) force=1; shift;;
      --model-dir) need_value "$@"; MODEL_DIR=$2; shift 2;;
      --bucket) need_value "$@"; BUCKET=$2; shift 2;;
      --no-distributed) distributed=0; shift;;
      --) extra=("${@:2}"); break;;
      *) usage_error "unknown run flag: $1";;
    esac
  done
  require RUN_NAME --run-name my-run
  valid_run_name
  local files=("${FILES[@]+"${FILES[@]}"}") binds=("${BINDS[@]+"${BINDS[@]}"}")
  ((${#files[@]})) || die "no gin file: pass --gin-file gin/experiments/NAME.gin --gin-file gin/schedules/NAME.gin" 2
  if [[ -z ${MODEL_DIR:-} ]]; then
    [[ -n ${BUCKET:-} ]] || die "MODEL_DIR is not set: pass --model-dir gs://BUCKET/runs/$RUN_NAME or --bucket gs://BUCKET (or export MODEL_DIR or BUCKET)" 2
    MODEL_DIR=${BUCKET%/}/runs/$RUN_NAME
  fi
  # Quoted for gin, so any path is a string literal (a bare './x' would not parse).
  [[ $MODEL_DIR != *[\'\\]* ]] || die "MODEL_DIR may not contain quotes or backslashes: $MODEL_DIR" 2
  [[ $MODEL_DIR == gs://* ]] || warn "MODEL_DIR $MODEL_DIR is not on gs://: every worker of a multi-host slice writes its own local copy"
  if [[ -n ${ACCELERATOR_TYPE:-} ]] && ((!force)); then
    require_fit "$ACCELERATOR_TYPE" "${files[@]}" "--gin.MODEL_DIR='$MODEL_DIR'" ${binds[@]+"${binds[@]}"}
  fi
  local train=(.venv/bin/python -u -m midas_jax.train "${files[@]}" "--gin.MODEL_DIR='$MODEL_DIR'")
  ((distributed)) && train+=(--gin.midas_jax.sharding.initialize_distributed.enabled=True)
  train+=(${binds[@]+"${binds[@]}"} ${extra[@]+"${extra[@]}"})
  qcmd "${train[@]}"; local t=$REPLY
  local d; q "$REMOTE_DIR"; d=$REPLY
  local log=logs/$RUN_NAME.log pid=logs/$RUN_NAME.pid
  ssh_all "cd $d && [ -x .venv/bin/python ] || { echo \"no $d/.venv on \$(hostname): run $PROG setup first\" >&2; exit 1; }; \
mkdir -p logs; if [ -f $pid ] && kill -0 \"\$(cat $pid)\" 2>/dev/null; then \
echo \"$RUN_NAME is already running on \$(hostname) (pid \$(cat $pid)); $PROG stop stops it\" >&2; exit 1; fi; \
nohup $t >> $log 2>&1 < /dev/null & echo \$! > $pid; echo \"started $RUN_NAME on \$(hostname): pid \$!, log $d/$log\""
}

cmd_logs() {
  local worker=${WORKER:-0} lines=100 follow=-F
  while (($#)); do
    case $1 in
      --run-name) need_value "$@"; RUN_NAME=$2; shift 2;;
      --worker) need_value "$@"; worker=$2; shift 2;;
      --lines|-n) need_value "$@"; lines=$2; shift 2;;
      --no-follow) follow=""; shift;;
      *) usage_error "unknown logs flag: $1";;
    esac
  done
  require RUN_NAME --run-name my-run
  valid_run_name
  [[ $lines =~ ^[0-9]+$ ]] || usage_error "--lines takes a number, got '$lines'"
  local d; q "$REMOTE_DIR"; d=$REPLY
  x gcloud compute tpus tpu-vm ssh "$TPU_NAME" "${LOC[@]}" --worker="$worker" \
    --command="tail -n $lines ${follow:+$follow }$d/logs/$RUN_NAME.log"
}

cmd_stop() {
  local timeout=600
  while (($#)); do
    case $1 in
      --run-name) need_value "$@"; RUN_NAME=$2; shift 2;;
      --timeout) need_value "$@"; timeout=$2; shift 2;;
      *) usage_error "unknown stop flag: $1";;
    esac
  done
  require RUN_NAME --run-name my-run
  valid_run_name
  [[ $timeout =~ ^[0-9]+$ ]] || usage_error "--timeout takes seconds, got '$timeout'"
  local d; q "$REMOTE_DIR"; d=$REPLY
  local r=$RUN_NAME p="$d/logs/$RUN_NAME.pid"
  # SIGTERM, not SIGKILL: the trainer saves a checkpoint and exits. Waiting for that keeps a
  # following `delete` from cutting the save short.
  local payload="pid=\$(cat $p 2>/dev/null || true); \
if [ -z \"\$pid\" ] || ! kill -0 \"\$pid\" 2>/dev/null; then echo \"$r is not running on \$(hostname)\"; exit 0; fi; \
kill -TERM \"\$pid\"; echo \"sent SIGTERM to $r (pid \$pid) on \$(hostname)\""
  if ((timeout > 0)); then
    payload+="; i=0; while kill -0 \"\$pid\" 2>/dev/null && [ \$i -lt $((timeout * 5)) ]; do sleep 0.2; i=\$((i+1)); done; \
if kill -0 \"\$pid\" 2>/dev/null; then echo \"$r still running on \$(hostname) after ${timeout}s\" >&2; exit 1; fi; \
echo \"$r stopped on \$(hostname)\""
  fi
  ssh_all "$payload"
}

cmd_delete() {
  local yes=0
  while (($#)); do
    case $1 in
      --yes|-y) yes=1; shift;;
      *) usage_error "unknown delete flag: $1";;
    esac
  done
  if ((!yes && !DRY_RUN)); then
    local answer=""
    printf 'Delete queued resource %s and its TPU node (zone %s, project %s)? [y/N] ' \
      "$TPU_NAME" "$ZONE" "$PROJECT" >&2
    read -r answer || true
    [[ $answer == [yY] || $answer == [yY][eE][sS] ]] || die "not deleted"
  fi
  # --force deletes the node with the queued resource; --quiet skips gcloud's own prompt.
  x gcloud compute tpus queued-resources delete "$TPU_NAME" "${LOC[@]}" --force --quiet
}

main() {
  DRY_RUN=0
  TPU_NAME=${TPU_NAME:-} ZONE=${ZONE:-} PROJECT=${PROJECT:-} REMOTE_DIR=${REMOTE_DIR:-midas_jax}
  local cmd="" rest=() a
  # Global flags may sit anywhere before `--`; the first bare word is the subcommand, and the
  # remaining words go to it in order. `--flag=value` is split, except verbatim `--gin.X=V`.
  while (($#)); do
    a=$1
    if [[ $a == -- ]]; then rest+=("$@"); break; fi
    if [[ $a == --?*=* && $a != --gin.* ]]; then set -- "${a%%=*}" "${a#*=}" "${@:2}"; a=$1; fi
    case $a in
      -h|--help) usage; exit 0;;
      --dry-run) DRY_RUN=1; shift;;
      --name|--tpu-name) need_value "$@"; TPU_NAME=$2; shift 2;;
      --zone) need_value "$@"; ZONE=$2; shift 2;;
      --project) need_value "$@"; PROJECT=$2; shift 2;;
      --remote-dir) need_value "$@"; REMOTE_DIR=$2; shift 2;;
      -*) [[ -n $cmd ]] || usage_error "unknown flag before the subcommand: $a"
          rest+=("$a"); shift;;
      *) if [[ -z $cmd ]]; then cmd=$a; else rest+=("$a"); fi; shift;;
    esac
  done
  [[ -n $cmd ]] || usage_error "no subcommand given"
  case $cmd in
    create|status|setup|run|logs|stop|delete) ;;
    check) cmd_check "${rest[@]+"${rest[@]}"}"; return;;  # local: no slice, zone or project
    *) usage_error "unknown subcommand: $cmd";;
  esac
  require TPU_NAME --name my-tpu
  require ZONE --zone us-central2-b
  require PROJECT --project my-project
  [[ -n $REMOTE_DIR && $REMOTE_DIR != *[\'\\]* ]] || die "REMOTE_DIR may not be empty or hold quotes or backslashes" 2
  loc
  "cmd_$cmd" "${rest[@]+"${rest[@]}"}"
}

main "$@"
