#!/usr/bin/env bash
# Set up everything creditaudit needs, idempotently: a virtualenv in .venv with pinned packages,
# and the default dataset (Fashion-MNIST). Safe to run again; each step is skipped once done.
#
#   scripts/setup.sh                what `creditaudit audit` needs: the package and its dependencies
#   scripts/setup.sh EXTRA...       and these extras of pyproject.toml: test (the test suite; it holds
#                                   every other extra), docs, notebook, data, ray, tensorboard, mlflow
#
# The venv keeps what it has: it is never downgraded to fewer extras (`make test` then `make audit`
# installs nothing), only upgraded (`make audit` then `make test` adds the test extras).
#
#   CREDITAUDIT_PYTHON=python3.12   interpreter to build the venv with (default: python3)
#   CREDITAUDIT_VENV=path           where the venv lives (default: .venv in the repository)
#   CREDITAUDIT_SYSTEM_TORCH=1      build the venv with --system-site-packages and keep the torch found
#                                   there (a CUDA build, say) instead of installing torch==2.13.0
#   CREDITAUDIT_SKIP_DATA=1         do not fetch the default dataset
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${CREDITAUDIT_PYTHON:-python3}
VENV=${CREDITAUDIT_VENV:-.venv}
TORCH_PIN="torch==2.13.0"

die() { printf 'setup: %s\n' "$*" >&2; exit 1; }
command -v "$PY" >/dev/null || die "no $PY on PATH; install Python >= 3.10 or set CREDITAUDIT_PYTHON"

# The stamp: line 1 the checksum of what pins the packages, line 2 the extras installed.
stamp="$VENV/.creditaudit-setup"
want=$(cat pyproject.toml requirements/constraints.txt scripts/setup.sh | cksum)
have=""; have_extras=""
[ -f "$stamp" ] && { have=$(sed -n 1p "$stamp"); have_extras=$(sed -n 2p "$stamp"); }
missing=""
for extra in "$@"; do
  grep -q "^$extra = \[" pyproject.toml || die "no extra '$extra' in pyproject.toml [project.optional-dependencies]"
  case " $have_extras " in *" $extra "* | *" test "*) ;; *) missing="$missing $extra" ;; esac
done
if [ "$have" != "$want" ] || [ -n "$missing" ]; then
  # What was installed stays (a re-pin reinstalls it too), plus what is asked for now.
  extras=$(printf '%s\n' $have_extras "$@" | sort -u | tr '\n' ' ' | sed 's/ *$//')
  if [ ! -x "$VENV/bin/python" ]; then
    echo "setup: creating virtualenv $VENV"
    if [ "${CREDITAUDIT_SYSTEM_TORCH:-0}" = 1 ]; then
      "$PY" -m venv --system-site-packages "$VENV" || die "could not create $VENV (on Debian: apt-get install python3-venv)"
    else
      "$PY" -m venv "$VENV" || die "could not create $VENV (on Debian: apt-get install python3-venv)"
    fi
  fi
  pip=("$VENV/bin/python" -m pip --disable-pip-version-check -q)
  # torch first and alone: a pinned CPU build here, or the user's own build kept.
  if "$VENV/bin/python" -c 'import torch' 2>/dev/null; then
    echo "setup: keeping installed torch $("$VENV/bin/python" -c 'import torch; print(torch.__version__)')"
  else
    echo "setup: installing $TORCH_PIN"
    "${pip[@]}" install "$TORCH_PIN" || die "could not install $TORCH_PIN (offline? set CREDITAUDIT_SYSTEM_TORCH=1 to use an installed torch)"
  fi
  target="."; [ -n "$extras" ] && target=".[${extras// /,}]"
  echo "setup: installing creditaudit${extras:+ with [$extras]} and pinned dependencies"
  "${pip[@]}" install -c requirements/constraints.txt -e "$target" || die "pip could not install the pinned dependencies (see above)"
  printf '%s\n%s\n' "$want" "$extras" > "$stamp"
fi

if [ "${CREDITAUDIT_SKIP_DATA:-0}" != 1 ]; then
  if ! "$VENV/bin/creditaudit" data check fashion_mnist >/dev/null 2>&1; then
    # Debian and Ubuntu package the dataset: no download from the dataset's own hosts needed.
    if command -v apt-get >/dev/null; then
      sudo=""; [ "$(id -u)" = 0 ] || { command -v sudo >/dev/null && sudo -n true 2>/dev/null && sudo="sudo -n"; }
      if [ "$(id -u)" = 0 ] || [ -n "$sudo" ]; then
        echo "setup: installing Debian package dataset-fashion-mnist"
        { $sudo apt-get update -qq && DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq dataset-fashion-mnist; } >/dev/null 2>&1 \
          || echo "setup: apt-get could not install dataset-fashion-mnist; trying a download"
      fi
    fi
    "$VENV/bin/creditaudit" data fetch fashion_mnist || die "the default dataset is missing (see the message above)"
  fi
fi
