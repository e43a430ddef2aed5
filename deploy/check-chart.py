#!/usr/bin/env python3
"""Checks helm/flotilla with Helm's own engine (helm-python-sdk, Helm's Go SDK without the
helm binary): a strict lint, renders with the default values and with
examples/production.yaml, and every rendered object validated by kubernetes-validate
against a current Kubernetes version. Prints one line per check and exits non-zero on any
failure. The ServiceMonitor (a Prometheus Operator CRD) has no upstream schema: it is
checked for the fields the operator needs instead.
"""

import json
import pathlib
import sys

import helm_python as helm
import kubernetes_validate
import yaml

KUBE = "1.33.0"
ROOT = pathlib.Path(__file__).resolve().parent.parent
CHART = ROOT / "helm" / "flotilla"
failures = []


def check(name, ok, detail=""):
    print(("ok   " if ok else "FAIL ") + name + (f": {detail}" if detail and not ok else ""))
    if not ok:
        failures.append(name)


def render(values, label):
    chart = helm.Chart.load(str(CHART))
    try:
        chart.validate_schema(values)
        check(f"{label}: values match values.schema.json", True)
    except helm.HelmError as e:
        check(f"{label}: values match values.schema.json", False, str(e))
    out = chart.render(values, name="flotilla", namespace="flotilla", is_install=True)
    docs = []
    for path, text in sorted(out.items()):
        if path.endswith("NOTES.txt"):
            check(f"{label}: NOTES.txt renders", "flotilla-hub" in text, text[:200])
            continue
        for doc in yaml.safe_load_all(text):
            if doc:
                docs.append((path, doc))
    return docs


def validate(docs, label):
    kinds = {}
    for path, doc in docs:
        kind = doc.get("kind")
        kinds[kind] = kinds.get(kind, 0) + 1
        name = f"{label}: {kind}/{doc['metadata']['name']}"
        if kind == "ServiceMonitor":
            ep = doc["spec"]["endpoints"][0]
            check(name + " (operator fields)", ep["port"] == "http" and ep["path"] == "/metrics")
            continue
        try:
            kubernetes_validate.validate(doc, KUBE, strict=True)
            check(name + f" is valid Kubernetes {KUBE}", True)
        except kubernetes_validate.ValidationError as e:
            check(name + f" is valid Kubernetes {KUBE}", False, str(e))
    return kinds


def hub_checks(docs, label, replicas):
    by = {(d["kind"], d["metadata"]["name"]): d for _, d in docs}
    sts = by[("StatefulSet", "flotilla-hub")]
    spec = sts["spec"]["template"]["spec"]
    c = spec["containers"][0]
    check(f"{label}: hubs start together (Parallel)", sts["spec"]["podManagementPolicy"] == "Parallel")
    check(f"{label}: {replicas} hubs", sts["spec"]["replicas"] == replicas)
    sec = c["securityContext"]
    check(
        f"{label}: hub runs non-root, read-only root, no escalation",
        spec["securityContext"]["runAsNonRoot"] and sec["readOnlyRootFilesystem"]
        and not sec["allowPrivilegeEscalation"],
    )
    check(f"{label}: probes on /healthz and /readyz",
          c["livenessProbe"]["httpGet"]["path"] == "/healthz" and c["readinessProbe"]["httpGet"]["path"] == "/readyz")
    headless = by[("Service", "flotilla-hubs")]
    check(f"{label}: hub names resolve before ready", headless["spec"].get("publishNotReadyAddresses") is True)
    check(f"{label}: one hub down at a time", by[("PodDisruptionBudget", "flotilla-hub")]["spec"]["maxUnavailable"] == 1)
    toml_text = by[("ConfigMap", "flotilla-hub")]["data"]["hub.toml"]
    try:
        import tomllib
        cfg = tomllib.loads(toml_text.replace("${HOSTNAME}", "flotilla-hub-0"))
        ids = [p["id"] for p in cfg["peers"]]
        check(f"{label}: hub.toml parses with {replicas} peers", ids == list(range(1, replicas + 1)), str(ids))
        check(f"{label}: hub.toml takes its id from the pod", cfg.get("id_from_hostname") is True and "id" not in cfg)
    except Exception as e:  # noqa: BLE001 - any parse failure is the finding
        check(f"{label}: hub.toml parses", False, f"{e}\n{toml_text}")
    pol = by.get(("NetworkPolicy", "flotilla-hub"))
    if pol:
        raft_rule = pol["spec"]["ingress"][0]
        only_hubs = raft_rule["from"][0]["podSelector"]["matchLabels"]["app.kubernetes.io/component"] == "hub"
        check(f"{label}: Raft only from hubs", only_hubs and {"port": 7444} in raft_rule["ports"])
        open_raft = [r for r in pol["spec"]["ingress"][1:] if {"port": 7444} in r.get("ports", [])]
        check(f"{label}: no other rule opens Raft", not open_raft)
    node_cm = by.get(("ConfigMap", "flotilla-node"))
    if node_cm:
        import tomllib
        text = node_cm["data"]["node.toml"]
        try:
            n = tomllib.loads(text.replace("${HOSTNAME}", "n-1").replace("${FLOTILLA_JOIN_TOKEN}", "t"))
            check(f"{label}: node.toml parses with its servers", len(n.get("servers", [])) >= 1, text)
        except Exception as e:  # noqa: BLE001
            check(f"{label}: node.toml parses", False, f"{e}\n{text}")


def main():
    report = helm.lint(str(CHART), strict=True, kube_version=f"v{KUBE}")
    problems = [m for m in report.get("messages", []) if m.get("severity", 0) >= 2] + report.get("errors", [])
    check("helm lint --strict", not problems, json.dumps(problems, indent=1))
    default = render({}, "defaults")
    kinds = validate(default, "defaults")
    hub_checks(default, "defaults", 3)
    check("defaults: a Deployment of nodes", kinds.get("Deployment") == 1 and "DaemonSet" not in kinds, str(kinds))
    prod_values = yaml.safe_load((CHART / "examples" / "production.yaml").read_text())
    report = helm.lint(str(CHART), prod_values, strict=True, kube_version=f"v{KUBE}")
    problems = [m for m in report.get("messages", []) if m.get("severity", 0) >= 2] + report.get("errors", [])
    check("helm lint --strict (production values)", not problems, json.dumps(problems, indent=1))
    prod = render(prod_values, "production")
    kinds = validate(prod, "production")
    hub_checks(prod, "production", 5)
    check("production: a DaemonSet of nodes and a ServiceMonitor",
          kinds.get("DaemonSet") == 1 and kinds.get("ServiceMonitor") == 1, str(kinds))
    # Values the schema must refuse.
    chart = helm.Chart.load(str(CHART))
    for bad, why in [({"hub": {"replicas": 2}}, "an even number of hubs"),
                     ({"node": {"kind": "StatefulSet"}}, "an unknown node kind"),
                     ({"hubs": 3}, "an unknown key")]:
        try:
            chart.validate_schema(bad)
            check(f"schema refuses {why}", False, "accepted")
        except helm.HelmError:
            check(f"schema refuses {why}", True)
    print(f"chart: {len(failures)} failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
