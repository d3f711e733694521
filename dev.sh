#!/usr/bin/env bash
# One command to set up and run:  bash dev.sh demo [args]  |  bash dev.sh test [pytest args]
# Creates .venv (or $VENV), installs the pinned torch first, then mae-timm with the extras the task needs.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
task=${1:-}
shift || true
case "$task" in
  demo) extras="data,viz" ;;
  test) extras="test" ;;
  *) echo "usage: bash dev.sh demo|test [args...]" >&2; exit 2 ;;
esac

venv=${VENV:-.venv}
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
# shellcheck disable=SC1091
source "$venv/bin/activate"
# torch first and pinned: these builds lie on this project's machines' disk; a range would download gigabytes
python -m pip install -q torch==2.14.1 torchvision==0.29.1
python -m pip install -q -e ".[$extras]"

if [ "$task" = test ]; then
  # the real Fashion-MNIST files for the real-data tests (Debian package, MIT licence)
  if [ ! -d /usr/share/datasets/fashion-mnist ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 \
      || { apt-get update -q >/dev/null && apt-get install -y -q dataset-fashion-mnist >/dev/null; } \
      || echo "dev.sh: could not install dataset-fashion-mnist; its real-data tests will be skipped" >&2
  fi
  # one test file per worker (module fixtures are built once), one worker per core, at most 4: the tests run torch
  # on one thread; pass -n 0 to run in this process (a debugger, or one test)
  exec python -m pytest -n auto --maxprocesses 4 --dist loadfile "$@"
fi
exec mae-timm demo "$@"
