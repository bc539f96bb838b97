#!/usr/bin/env bash
# Show a TPU's state and, per worker, whether jaxrm train runs and the last line of its log.
set -euo pipefail
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<EOF
Usage: $SCRIPT [flags]

Print the TPU's name, type, state and health (gcloud compute tpus tpu-vm describe), then one line
per worker: whether a jaxrm train process runs and the last line of ~/jaxrm-logs/HOSTNAME.log.

Flags (--flag VALUE or --flag=VALUE):
$COMMON_HELP
EOF
}

split_flag_values "$@"
set -- "${ARGS[@]}"
while (($#)); do
  parse_common_flag "$@"
  shift "$COMMON_SHIFT"
done
require_tpu

# On each worker. A progress bar rewrites its line with \r: show the newest part.
STATUS=$(cat <<'EOF'
h=$(hostname); log=$HOME/jaxrm-logs/$h.log
pids=$(pgrep -d, -f "$pattern")
if [ -n "$pids" ]; then state="running (pid $pids)"; else state="not running"; fi
if [ -f "$log" ]; then last=$(tail -c 4096 "$log" | tr '\r' '\n' | grep -v '^[[:space:]]*$' | tail -n 1); else last="(no log yet)"; fi
echo "$h: jaxrm train $state; log: $last"
EOF
)

run gcloud compute tpus tpu-vm describe "$NAME" "--zone=$ZONE" "--project=$PROJECT" \
  "--format=table(name.basename(),acceleratorType,state,health)"
tpu_ssh all "$(remote_command "$STATUS" "pattern=$TRAIN_PATTERN")"
