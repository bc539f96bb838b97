# shellcheck shell=bash
# Sourced by every tpu_scripts/*.sh: settings, flag parsing, quoting, and `run`, the one place that
# runs a command or, with --dry-run, prints it.
# The scripts that source this file read its variables, so they look unused here:
# shellcheck disable=SC2034

if ((BASH_VERSINFO[0] * 100 + BASH_VERSINFO[1] < 404)); then
  echo "$0 needs bash 4.4 or newer, this is $BASH_VERSION (macOS: brew install bash)" >&2
  exit 2
fi

SCRIPT=$(basename "$0")
SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_ROOT=$(dirname "$SCRIPT_DIR")

# Settings every script takes: flags win over these environment variables.
NAME=${JAXRM_TPU_NAME:-}
ZONE=${JAXRM_TPU_ZONE:-}
PROJECT=${JAXRM_TPU_PROJECT:-}
DRY_RUN=0

COMMON_HELP="  --name NAME        TPU VM / pod name (env JAXRM_TPU_NAME)
  --zone ZONE        zone, e.g. us-east5-a (env JAXRM_TPU_ZONE)
  --project PROJECT  Google Cloud project id (env JAXRM_TPU_PROJECT)
  --dry-run          print the commands, shell-quoted, one per line, and run nothing
  -h, --help         show this help"

# On the workers: the source shipped by setup.sh is in ~/jaxrm, jaxrm is installed in the virtual
# environment ~/jaxrm-venv, launch.sh writes ~/jaxrm-logs/HOSTNAME.log and copies configs from
# outside the repository to ~/jaxrm-configs.
#
# Matches a training process however it was started (`python -m jaxrm train`, the `jaxrm` script).
# Anchored at the interpreter so that the remote shell, whose command line holds this very text,
# never matches itself.
TRAIN_PATTERN='^[^ ]*python[0-9.]* (-m jaxrm|[^ ]*/jaxrm) train( |$)'

say() { printf '%s\n' "$*" >&2; }
die() { say "$SCRIPT: $*"; exit 2; }  # a usage or settings error, found before any gcloud call
fail() { say "$SCRIPT: $*"; exit 1; }

# --flag=VALUE -> --flag VALUE, so that both spellings work. Result in ARGS.
split_flag_values() {
  ARGS=()
  local arg
  for arg; do
    if [[ $arg == --*=* ]]; then ARGS+=("${arg%%=*}" "${arg#*=}"); else ARGS+=("$arg"); fi
  done
}

flag_value() {  # FLAG [VALUE ...]: print VALUE, or stop when the flag has none
  [[ $# -ge 2 && -n $2 && $2 != --* ]] || die "$1 needs a value (see $SCRIPT --help)"
  printf '%s' "$2"
}

# Handles the flags every script takes and rejects the rest; sets COMMON_SHIFT to the words used.
parse_common_flag() {
  COMMON_SHIFT=2
  case $1 in
    --name) NAME=$(flag_value "$@") ;;
    --zone) ZONE=$(flag_value "$@") ;;
    --project) PROJECT=$(flag_value "$@") ;;
    --dry-run) DRY_RUN=1 COMMON_SHIFT=1 ;;
    -h | --help) usage; exit 0 ;;
    -*) die "unknown flag $1 (see $SCRIPT --help)" ;;
    *) die "unexpected argument '$1' (see $SCRIPT --help)" ;;
  esac
}

require() {  # VALUE WHAT FLAG [ENV]
  [[ -n $1 ]] && return
  if [[ -n ${4:-} ]]; then die "missing $2: pass $3 or export $4"; fi
  die "missing $2: pass $3"
}

require_int() {  # VALUE FLAG
  [[ $1 =~ ^[0-9]+$ ]] || die "$2 takes a whole number, not '$1'"
}

is_on() {  # VALUE WHAT: a boolean setting from the environment
  case $1 in
    1 | true | yes) return 0 ;;
    '' | 0 | false | no) return 1 ;;
    *) die "$2 must be 1 or 0, not '$1'" ;;
  esac
}

# Checks the settings every script needs; call it after parsing the flags.
require_tpu() {
  require "$NAME" "TPU name" "--name NAME" JAXRM_TPU_NAME
  require "$ZONE" "TPU zone" "--zone ZONE" JAXRM_TPU_ZONE
  require "$PROJECT" "Google Cloud project" "--project PROJECT" JAXRM_TPU_PROJECT
  [[ $NAME =~ ^[a-z][-a-z0-9]*$ ]] ||
    die "TPU name '$NAME' must start with a lowercase letter and hold only a-z, 0-9 and '-'"
  if ((!DRY_RUN)) && ! command -v gcloud >/dev/null; then
    die "gcloud is not on PATH: install the Google Cloud CLI (https://cloud.google.com/sdk/docs/install)"
  fi
}

# One word for a POSIX shell, quoted only when needed (the same output as Python's shlex.quote).
SAFE_WORD='^[A-Za-z0-9_@%+=:,./-]+$'
quote() {
  if [[ $1 =~ $SAFE_WORD ]]; then
    printf '%s' "$1"
  else
    printf "'%s'" "${1//\'/\'\"\'\"\'}"
  fi
}

quote_words() {
  local words=() word
  for word; do words+=("$(quote "$word")"); done
  printf '%s' "${words[*]}"
}

run() {  # COMMAND [ARG ...]
  if ((DRY_RUN)); then
    printf '%s\n' "$(quote_words "$@")"
  else
    "$@"
  fi
}

# The one-line command a worker runs: VAR=value assignments (quoted here) followed by BODY, a fixed
# script that reads them. BODY holds one complete command per line; the lines are joined by "; ".
remote_command() {  # BODY [VAR=VALUE ...]
  local body=$1 assignment line=""
  shift
  for assignment; do
    line+="${assignment%%=*}=$(quote "${assignment#*=}"); "
  done
  printf '%s' "$line${body//$'\n'/; }"
}

tpu_ssh() {  # WORKER COMMAND: run COMMAND on one worker (an index) or on all of them at once
  run gcloud compute tpus tpu-vm ssh "$NAME" "--zone=$ZONE" "--project=$PROJECT" \
    "--worker=$1" "--command=$2"
}

tpu_scp_to_all() {  # LOCAL_FILE REMOTE_PATH (relative to the home directory)
  run gcloud compute tpus tpu-vm scp "$1" "$NAME:$2" "--zone=$ZONE" "--project=$PROJECT" \
    --worker=all
}

# The settings flags, for the follow-up commands the scripts suggest.
tpu_flags() {
  quote_words --name "$NAME" --zone "$ZONE" --project "$PROJECT"
}
