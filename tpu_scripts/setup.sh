#!/usr/bin/env bash
# Install jaxrm with its TPU extra on every worker of a TPU VM / pod, then check that JAX sees the
# whole slice.
set -euo pipefail
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<EOF
Usage: $SCRIPT [flags]

Install jaxrm on every worker (--worker=all) into the virtual environment ~/jaxrm-venv, made with
uv for the Python version below (jax needs a newer Python than the TPU images ship). By default
ships this checkout as \`git archive HEAD\` (committed files only) to ~/jaxrm and runs
\`pip install -e '.[tpu]'\` there. Ends by printing, per worker, JAX's process and device counts.

Flags (--flag VALUE or --flag=VALUE):
  --pip SPEC         install this pip requirement instead of the checkout, e.g. 'jaxrm[tpu]==0.1.0'
                     (env JAXRM_TPU_PIP)
  --python VERSION   Python for ~/jaxrm-venv when it is made (env JAXRM_TPU_PYTHON, default 3.11)
$COMMON_HELP
EOF
}

PIP_SPEC=${JAXRM_TPU_PIP:-}
PYTHON=${JAXRM_TPU_PYTHON:-3.11}

split_flag_values "$@"
set -- "${ARGS[@]}"
while (($#)); do
  case $1 in
    --pip) PIP_SPEC=$(flag_value "$@"); shift ;;
    --python) PYTHON=$(flag_value "$@"); shift ;;
    *) parse_common_flag "$@"; shift "$COMMON_SHIFT"; continue ;;
  esac
  shift
done
require_tpu

# Remote scripts (one command per line, see remote_command). uv comes from pip; `uv venv` fetches
# the Python it is asked for when the image lacks it.
PREPARE=$(cat <<'EOF'
set -e
mkdir -p "$HOME/jaxrm-logs" "$HOME/jaxrm-configs"
python3 -m uv --version >/dev/null 2>&1 || python3 -m pip install --user --quiet uv
[ -x "$HOME/jaxrm-venv/bin/python" ] || python3 -m uv venv --python "$python" "$HOME/jaxrm-venv"
EOF
)
# Unpacks over the previous copy, so that run outputs kept under ~/jaxrm survive.
INSTALL_SOURCE=$(cat <<'EOF'
mkdir -p "$HOME/jaxrm"
tar -xzf "$HOME/jaxrm.tar.gz" -C "$HOME/jaxrm"
rm "$HOME/jaxrm.tar.gz"
cd "$HOME/jaxrm"
python3 -m uv pip install --python "$HOME/jaxrm-venv/bin/python" -e '.[tpu]'
echo "$(hostname): installed jaxrm from $HOME/jaxrm"
EOF
)
INSTALL_PIP=$(cat <<'EOF'
python3 -m uv pip install --python "$HOME/jaxrm-venv/bin/python" "$spec"
echo "$(hostname): installed $spec"
EOF
)
# Every worker must run this at the same time: JAX waits for the whole slice.
CHECK=$(cat <<'EOF'
if pgrep -f "$pattern" >/dev/null; then echo "$(hostname): jaxrm train is running, TPU check skipped"; exit 0; fi
"$HOME/jaxrm-venv/bin/python" -c 'import jax, socket; print(f"{socket.gethostname()}: process {jax.process_index()} of {jax.process_count()}, {jax.local_device_count()} of {jax.device_count()} {jax.default_backend()} devices")'
EOF
)

if [[ -n $PIP_SPEC ]]; then
  tpu_ssh all "$(remote_command "$PREPARE"$'\n'"$INSTALL_PIP" "python=$PYTHON" "spec=$PIP_SPEC")"
else
  git -C "$REPO_ROOT" rev-parse --verify --quiet HEAD >/dev/null ||
    die "$REPO_ROOT is not a git checkout with a commit: pass --pip SPEC (e.g. --pip 'jaxrm[tpu]')"
  if [[ -n $(GIT_OPTIONAL_LOCKS=0 git -C "$REPO_ROOT" status --porcelain --untracked-files=no) ]]; then
    say "$SCRIPT: note: uncommitted changes in $REPO_ROOT are not shipped (git archive HEAD)"
  fi
  cache=${XDG_CACHE_HOME:-$HOME/.cache}/jaxrm-tpu
  archive=$cache/$NAME.tar.gz
  run mkdir -p "$cache"
  run git -C "$REPO_ROOT" archive --format=tar.gz -o "$archive" HEAD
  tpu_scp_to_all "$archive" jaxrm.tar.gz
  tpu_ssh all "$(remote_command "$PREPARE"$'\n'"$INSTALL_SOURCE" "python=$PYTHON")"
fi
tpu_ssh all "$(remote_command "$CHECK" "pattern=$TRAIN_PATTERN")"
((DRY_RUN)) || say "Next: $(dirname "$0")/launch.sh CONFIG.yaml [key=value ...] $(tpu_flags)"
