#!/usr/bin/env bash
# Show or follow the jaxrm train log of one worker or of all of them.
set -euo pipefail
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<EOF
Usage: $SCRIPT [flags]

Print the end of ~/jaxrm-logs/HOSTNAME.log, the log launch.sh starts, on one worker or on all of
them (each line then starts with the worker's hostname).

Flags (--flag VALUE or --flag=VALUE):
  --worker N         worker index, or all (default all)
  --follow           keep printing new lines until Ctrl-C
  --lines N          how many lines to print first (default 50)
$COMMON_HELP
EOF
}

WORKER=all FOLLOW=0 LINES=50
split_flag_values "$@"
set -- "${ARGS[@]}"
while (($#)); do
  case $1 in
    --worker) WORKER=$(flag_value "$@"); shift ;;
    --follow) FOLLOW=1 ;;
    --lines) LINES=$(flag_value "$@"); shift ;;
    *) parse_common_flag "$@"; shift "$COMMON_SHIFT"; continue ;;
  esac
  shift
done
require_tpu
[[ $WORKER == all || $WORKER =~ ^[0-9]+$ ]] || die "--worker takes a worker index or all, not '$WORKER'"
require_int "$LINES" --lines

# On each worker.
LOGS=$(cat <<'EOF'
h=$(hostname); log=$HOME/jaxrm-logs/$h.log
if [ ! -f "$log" ]; then echo "$h: no log yet ($log is written by launch.sh)" >&2; exit 1; fi
if [ "$label" = 1 ]; then tail -n "$lines" $follow "$log" | sed -u "s/^/$h: /"; else tail -n "$lines" $follow "$log"; fi
EOF
)

follow="" label=0
if ((FOLLOW)); then follow=-f; fi
if [[ $WORKER == all ]]; then label=1; fi
tpu_ssh "$WORKER" "$(remote_command "$LOGS" "lines=$LINES" "follow=$follow" "label=$label")"
