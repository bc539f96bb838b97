#!/usr/bin/env bash
# Start `jaxrm train CONFIG [key=value ...]` on every worker of a TPU VM / pod, detached from ssh.
set -euo pipefail
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<EOF
Usage: $SCRIPT CONFIG.yaml [key=value ...] [flags]

Run \`jaxrm train CONFIG.yaml key=value ...\` on every worker with the same arguments, detached
(nohup setsid, stdin from /dev/null) so that it survives the ssh session, in ~/jaxrm (the checkout
setup.sh shipped; the home directory after setup.sh --pip). Each worker logs to
~/jaxrm-logs/HOSTNAME.log. jaxrm train finds the other hosts of the slice by itself.

CONFIG is read on the workers: a file tracked in this checkout by its path in ~/jaxrm (as of the
last setup.sh), any other local file is first copied to ~/jaxrm-configs/ on every worker, and a
path that is not a local file (e.g. gs://...) is passed as given.

Flags (--flag VALUE or --flag=VALUE):
  --env KEY=VALUE    environment for jaxrm train; repeatable (PYTHONUNBUFFERED=1 is always set)
$COMMON_HELP
EOF
}

ENVS=(PYTHONUNBUFFERED=1)
POSITIONAL=()
split_flag_values "$@"
set -- "${ARGS[@]}"
while (($#)); do
  case $1 in
    --env) ENVS+=("$(flag_value "$@")"); shift ;;
    -*) parse_common_flag "$@"; shift "$COMMON_SHIFT"; continue ;;
    *) POSITIONAL+=("$1") ;;
  esac
  shift
done
require_tpu
((${#POSITIONAL[@]})) || die "missing CONFIG: $SCRIPT CONFIG.yaml [key=value ...] (see --help)"
CONFIG=${POSITIONAL[0]}
OVERRIDES=("${POSITIONAL[@]:1}")
for override in "${OVERRIDES[@]}"; do
  [[ $override == ?*=* ]] || die "'$override' is not a key=value override"
done
for env in "${ENVS[@]}"; do
  [[ $env =~ ^[A-Za-z_][A-Za-z0-9_]*= ]] || die "--env takes KEY=VALUE, not '$env'"
done

# Sets REMOTE_CONFIG (a word for the workers' shell) and COPY (the local file to copy, if any).
place_config() {
  REMOTE_CONFIG=$(quote "$CONFIG") COPY=""
  [[ -f $CONFIG ]] || {
    say "$SCRIPT: note: $CONFIG is not a local file; the workers read it as given"
    return
  }
  local file repo
  file=$(cd "$(dirname "$CONFIG")" && pwd -P)/$(basename "$CONFIG")
  repo=$(cd "$REPO_ROOT" && pwd -P)
  if [[ $file == "$repo"/* ]] &&
    git -C "$repo" ls-files --error-unmatch -- "${file#"$repo"/}" >/dev/null 2>&1; then
    REMOTE_CONFIG=$(quote "${file#"$repo"/}")
    if [[ -n $(GIT_OPTIONAL_LOCKS=0 git -C "$repo" status --porcelain -- "$file") ]]; then
      say "$SCRIPT: note: $CONFIG has uncommitted changes; the workers use the copy setup.sh shipped"
    fi
    return
  fi
  local base
  base=$(basename "$CONFIG")
  [[ $base =~ ^[A-Za-z0-9._-]+$ ]] || die "rename $CONFIG to letters, digits, '.', '_' and '-' only"
  if grep -q '^base:' "$CONFIG"; then
    say "$SCRIPT: note: $CONFIG names a base: file, which the workers look for in ~/jaxrm-configs/"
  fi
  REMOTE_CONFIG=\~/jaxrm-configs/$base COPY=$CONFIG  # the tilde is for the workers' shell
}
place_config

# On each worker; the arguments of jaxrm train are in "$@".
LAUNCH=$(cat <<'EOF'
h=$(hostname); log=$HOME/jaxrm-logs/$h.log
cd "$HOME/jaxrm" 2>/dev/null || cd "$HOME"
if [ ! -x "$HOME/jaxrm-venv/bin/python" ]; then echo "$h: jaxrm is not installed: run setup.sh first" >&2; exit 1; fi
case $1 in *://*) ;; *) if [ ! -e "$1" ]; then echo "$h: no config $1 in $PWD" >&2; exit 1; fi ;; esac
if pgrep -f "$pattern" >/dev/null; then echo "$h: jaxrm train is already running: stop.sh ends it" >&2; exit 1; fi
mkdir -p "$HOME/jaxrm-logs"
echo "=== $(date -u '+%F %T UTC') jaxrm train $*" >>"$log"
nohup setsid "$HOME/jaxrm-venv/bin/python" -m jaxrm train "$@" </dev/null >>"$log" 2>&1 & echo "$h: started jaxrm train, log $log"
EOF
)

if [[ -n $COPY ]]; then
  tpu_scp_to_all "$COPY" "jaxrm-configs/$(basename "$COPY")"
fi
train_args=$REMOTE_CONFIG
for override in "${OVERRIDES[@]}"; do train_args+=" $(quote "$override")"; done
tpu_ssh all "export $(quote_words "${ENVS[@]}"); set -- $train_args; $(remote_command "$LAUNCH" "pattern=$TRAIN_PATTERN")"
if ((!DRY_RUN)); then
  say "Logs: ~/jaxrm-logs/HOSTNAME.log on each worker. Follow worker 0: $(dirname "$0")/logs.sh --worker 0 --follow $(tpu_flags)"
  say "Status of every worker: $(dirname "$0")/status.sh $(tpu_flags)"
fi
