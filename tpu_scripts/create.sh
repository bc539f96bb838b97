#!/usr/bin/env bash
# Create a Cloud TPU VM or pod slice, directly or as a queued resource.
set -euo pipefail
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<EOF
Usage: $SCRIPT [flags]

Create a TPU VM / pod slice (gcloud compute tpus tpu-vm create), or with --queued a queued resource
(gcloud compute tpus queued-resources create) and wait until it is ACTIVE.

Flags (--flag VALUE or --flag=VALUE):
  --type TYPE        accelerator type, e.g. v5p-64, v6e-16, v4-32 (env JAXRM_TPU_TYPE)
  --version VERSION  TPU runtime version (env JAXRM_TPU_VERSION); default from the type:
                     v2/v3/v4 tpu-ubuntu2204-base, v5litepod v2-alpha-tpuv5-lite,
                     v5p v2-alpha-tpuv5, v6e v2-alpha-tpuv6e
  --spot             Spot capacity: cheaper, may be preempted (env JAXRM_TPU_SPOT=1)
  --queued           request a queued resource with the TPU name as its id (env JAXRM_TPU_QUEUED=1)
  --no-wait          with --queued: return once the request is accepted
  --timeout SECONDS  with --queued: how long to wait for ACTIVE (env JAXRM_TPU_WAIT_TIMEOUT, 3600)
  --poll SECONDS     with --queued: time between state checks (env JAXRM_TPU_POLL_SECONDS, 30)
$COMMON_HELP
EOF
}

default_version() {  # TYPE: the runtime version Cloud TPU documents for that generation
  case $1 in
    v2-* | v3-* | v4-*) echo tpu-ubuntu2204-base ;;
    v5litepod-*) echo v2-alpha-tpuv5-lite ;;
    v5p-*) echo v2-alpha-tpuv5 ;;
    v6e-*) echo v2-alpha-tpuv6e ;;
  esac
}

TYPE=${JAXRM_TPU_TYPE:-}
VERSION=${JAXRM_TPU_VERSION:-}
SPOT=0 QUEUED=0 WAIT=1
is_on "${JAXRM_TPU_SPOT:-}" JAXRM_TPU_SPOT && SPOT=1
is_on "${JAXRM_TPU_QUEUED:-}" JAXRM_TPU_QUEUED && QUEUED=1
TIMEOUT=${JAXRM_TPU_WAIT_TIMEOUT:-3600}
POLL=${JAXRM_TPU_POLL_SECONDS:-30}

split_flag_values "$@"
set -- "${ARGS[@]}"
while (($#)); do
  case $1 in
    --type) TYPE=$(flag_value "$@"); shift ;;
    --version) VERSION=$(flag_value "$@"); shift ;;
    --spot) SPOT=1 ;;
    --queued) QUEUED=1 ;;
    --no-wait) WAIT=0 ;;
    --timeout) TIMEOUT=$(flag_value "$@"); shift ;;
    --poll) POLL=$(flag_value "$@"); shift ;;
    *) parse_common_flag "$@"; shift "$COMMON_SHIFT"; continue ;;
  esac
  shift
done

require_tpu
require "$TYPE" "accelerator type" "--type TYPE (e.g. v5p-64)" JAXRM_TPU_TYPE
VERSION=${VERSION:-$(default_version "$TYPE")}
require "$VERSION" "runtime version for $TYPE" "--version VERSION" JAXRM_TPU_VERSION
require_int "$TIMEOUT" --timeout
require_int "$POLL" --poll

wait_until_active() {
  local describe=(gcloud compute tpus queued-resources describe "$NAME" "--zone=$ZONE"
    "--project=$PROJECT" "--format=value(state.state)")
  if ((DRY_RUN)); then
    run "${describe[@]}"
    return
  fi
  local deadline=$((SECONDS + TIMEOUT)) state seen=""
  while true; do
    state=$("${describe[@]}") || state="unknown (describe failed)"
    if [[ $state != "$seen" ]]; then
      say "queued resource $NAME: $state"
      seen=$state
    fi
    case $state in
      ACTIVE) return ;;
      FAILED | SUSPENDING | SUSPENDED) fail "queued resource $NAME is $state; see why with: $(quote_words "${describe[@]:0:8}")" ;;
    esac
    ((SECONDS < deadline)) ||
      fail "queued resource $NAME is still $state after ${TIMEOUT}s; it stays queued. Check it with: $(quote_words "${describe[@]}"); cancel it with: $(dirname "$0")/delete.sh --queued $(tpu_flags)"
    sleep "$POLL"
  done
}

spot=()
if ((SPOT)); then spot=(--spot); fi
if ((QUEUED)); then
  run gcloud compute tpus queued-resources create "$NAME" "--node-id=$NAME" "--zone=$ZONE" \
    "--project=$PROJECT" "--accelerator-type=$TYPE" "--runtime-version=$VERSION" "${spot[@]}"
  if ((!WAIT)); then
    ((DRY_RUN)) || say "queued $NAME; $(dirname "$0")/status.sh works once it is ACTIVE"
    exit 0
  fi
  wait_until_active
else
  run gcloud compute tpus tpu-vm create "$NAME" "--zone=$ZONE" "--project=$PROJECT" \
    "--accelerator-type=$TYPE" "--version=$VERSION" "${spot[@]}"
fi
((DRY_RUN)) || say "$NAME is ready. Next: $(dirname "$0")/setup.sh $(tpu_flags)"
