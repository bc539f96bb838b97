#!/usr/bin/env bash
# Delete a TPU VM / pod, or the queued resource that holds it.
set -euo pipefail
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<EOF
Usage: $SCRIPT [flags]

Delete the TPU VM / pod (gcloud compute tpus tpu-vm delete), or with --queued the queued resource
and its TPU (gcloud compute tpus queued-resources delete --force). Asks first unless --yes.

Flags (--flag VALUE or --flag=VALUE):
  --queued           delete the queued resource named like the TPU (env JAXRM_TPU_QUEUED=1)
  --yes              do not ask (needed when stdin is not a terminal)
$COMMON_HELP
EOF
}

QUEUED=0 YES=0
is_on "${JAXRM_TPU_QUEUED:-}" JAXRM_TPU_QUEUED && QUEUED=1
split_flag_values "$@"
set -- "${ARGS[@]}"
while (($#)); do
  case $1 in
    --queued) QUEUED=1 ;;
    --yes) YES=1 ;;
    *) parse_common_flag "$@"; shift "$COMMON_SHIFT"; continue ;;
  esac
  shift
done
require_tpu

what="TPU $NAME"
if ((QUEUED)); then what="queued resource $NAME and its TPU"; fi
if ((!YES && !DRY_RUN)); then
  [[ -t 0 ]] || die "stdin is not a terminal: pass --yes to delete the $what without asking"
  read -r -p "Delete the $what in $ZONE (project $PROJECT)? [y/N] " answer
  [[ $answer == [yY]* ]] || fail "not deleted"
fi

if ((QUEUED)); then
  run gcloud compute tpus queued-resources delete "$NAME" "--zone=$ZONE" "--project=$PROJECT" \
    --force --quiet
else
  run gcloud compute tpus tpu-vm delete "$NAME" "--zone=$ZONE" "--project=$PROJECT" --quiet
fi
