#!/usr/bin/env bash
# Renders k8s/manifests/ratethrottle.yaml, the plain manifests for installing without Helm,
# from the chart: a Namespace, then
#   helm template ratethrottle charts/ratethrottle --namespace ratethrottle --set kubernetes.enabled=true
#
#   bash scripts/render-manifests.sh     # rewrite k8s/manifests/ratethrottle.yaml
#   bash scripts/render-manifests.sh -   # print to stdout instead (tests/chart.rs compares)
#
# helm: $RATETHROTTLE_TEST_HELM when set, else installed by scripts/k8s-tools.sh.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ -z "${RATETHROTTLE_TEST_HELM:-}" ]; then
    # shellcheck source=k8s-tools.sh
    source scripts/k8s-tools.sh >&2
fi
HELM="$RATETHROTTLE_TEST_HELM"

render() {
    cat <<'HEADER'
# ratethrottle for Kubernetes without Helm. GENERATED from the chart by
# `bash scripts/render-manifests.sh`, i.e. a Namespace followed by
#   helm template ratethrottle charts/ratethrottle --namespace ratethrottle --set kubernetes.enabled=true
# Do not edit: change the chart and re-run the script (tests/chart.rs fails on any drift).
#
# Install (the CRDs first: the Deployment watches RateLimitPolicy and AccessList objects):
#   kubectl apply -f k8s/crds/
#   kubectl apply -f k8s/manifests/ratethrottle.yaml
#
# One replica on in-memory storage, rules from the ConfigMap `ratethrottle` (hot-reloaded) and
# from RateLimitPolicy/AccessList objects in the namespace `ratethrottle`; Envoy reaches the
# gRPC services at ratethrottle.ratethrottle.svc.cluster.local:8081. For Redis, more replicas,
# autoscaling or a ServiceMonitor, use the chart (charts/ratethrottle/README.md).
---
apiVersion: v1
kind: Namespace
metadata:
  name: ratethrottle
  labels:
    app.kubernetes.io/part-of: ratethrottle
    pod-security.kubernetes.io/enforce: restricted
HEADER
    "$HELM" template ratethrottle charts/ratethrottle --namespace ratethrottle --set kubernetes.enabled=true
}

if [ "${1:-}" = - ]; then
    render
else
    out=k8s/manifests/ratethrottle.yaml
    render >"$out.tmp"
    mv "$out.tmp" "$out"
    echo "wrote $out"
fi
