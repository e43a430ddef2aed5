#!/usr/bin/env bash
# Lints, renders and validates helm/flotilla with Helm's own engine; with --run, runs what it
# renders in docker and proves the hubs form a cluster that serves a call (see check-chart.py).
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -c 'import helm_python, kubernetes_validate, yaml' 2>/dev/null ||
  pip install -q --break-system-packages helm-python-sdk==0.2.2 kubernetes-validate==1.37.0 pyyaml
exec python3 deploy/check-chart.py "$@"
