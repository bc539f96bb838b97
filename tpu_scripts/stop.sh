#!/usr/bin/env bash
# Stop jaxrm train on every worker and free the TPU for the next run.
set -euo pipefail
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<EOF
Usage: $SCRIPT [flags]

On every worker: send SIGTERM to jaxrm train (it saves a checkpoint and exits), SIGKILL it after
the grace period, kill any other process still holding the TPU devices (/dev/accel*, /dev/vfio/*;
found with sudo lsof) and remove a stale /tmp/libtpu_lockfile.

Flags (--flag VALUE or --flag=VALUE):
  --grace SECONDS    how long jaxrm train may take to exit after SIGTERM
                     (env JAXRM_TPU_STOP_GRACE, default 300; 0 kills it at once)
$COMMON_HELP
EOF
}

GRACE=${JAXRM_TPU_STOP_GRACE:-300}
split_flag_values "$@"
set -- "${ARGS[@]}"
while (($#)); do
  case $1 in
    --grace) GRACE=$(flag_value "$@"); shift ;;
    *) parse_common_flag "$@"; shift "$COMMON_SHIFT"; continue ;;
  esac
  shift
done
require_tpu
require_int "$GRACE" --grace

# On each worker.
STOP=$(cat <<'EOF'
h=$(hostname)
if pkill -TERM -f "$pattern"; then echo "$h: sent SIGTERM to jaxrm train, waiting up to ${grace}s"; fi
waited=0; while pgrep -f "$pattern" >/dev/null && [ "$waited" -lt "$grace" ]; do sleep 1; waited=$((waited + 1)); done
if pkill -KILL -f "$pattern"; then echo "$h: killed jaxrm train"; sleep 2; fi
devices=$(ls -d /dev/accel* /dev/vfio/* 2>/dev/null)
holders=""; if [ -n "$devices" ]; then holders=$(sudo -n lsof -t $devices 2>/dev/null | sort -u | tr '\n' ' '); fi
if [ -n "$holders" ]; then echo "$h: killing processes that hold the TPU: $holders"; sudo -n kill -9 $holders; fi
rm -f /tmp/libtpu_lockfile 2>/dev/null || sudo -n rm -f /tmp/libtpu_lockfile
echo "$h: stopped, TPU free"
EOF
)

tpu_ssh all "$(remote_command "$STOP" "pattern=$TRAIN_PATTERN" "grace=$GRACE")"
