#!/usr/bin/env python3
"""Checks helm/flotilla with Helm's own engine (helm-python-sdk, Helm's Go SDK without the
helm binary): a strict lint, renders with the default values and with
examples/production.yaml, and every rendered object validated by kubernetes-validate
against a current Kubernetes version. Prints one line per check and exits non-zero on any
failure. The ServiceMonitor (a Prometheus Operator CRD) has no upstream schema: it is
checked for the fields the operator needs instead.
"""

import json
import os
import pathlib
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request

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


def sh(*args, check=True, **kw):
    r = subprocess.run(list(args), capture_output=True, text=True, **kw)
    if check and r.returncode != 0:
        raise RuntimeError(f"{' '.join(args)}: {r.stderr.strip() or r.stdout.strip()}")
    return r


def wait(what, f, timeout=120):
    deadline = time.time() + timeout
    last = None
    while time.time() < deadline:
        try:
            v = f()
            if v:
                return v
        except Exception as e:  # noqa: BLE001 - keep the last reason for the failure
            last = e
        time.sleep(0.5)
    raise RuntimeError(f"timed out waiting for {what}" + (f" (last: {last})" if last else ""))


def docker_args(container, pod_spec):
    """docker run flags for a rendered container: user, read-only root, capabilities."""
    pod_sec = pod_spec.get("securityContext", {})
    sec = container.get("securityContext", {})
    out = ["--user", f"{pod_sec['runAsUser']}:{pod_sec['runAsGroup']}"]
    if sec.get("readOnlyRootFilesystem"):
        out.append("--read-only")
    if not sec.get("allowPrivilegeEscalation", True):
        out += ["--security-opt", "no-new-privileges"]
    for cap in sec.get("capabilities", {}).get("drop", []):
        out += ["--cap-drop", cap]
    for e in container.get("env", []):
        if "value" in e:
            out += ["-e", f"{e['name']}={e['value']}"]
    return out


def run_for_real(docs, scaled):
    """Runs the rendered hubs and a node for real; then `scaled` (the same chart with more
    hub replicas) as a `helm upgrade` would roll it out."""
    by = {(d["kind"], d["metadata"]["name"]): d for _, d in docs}
    for image in ("flotilla:dev", "flotilla-node:dev"):
        if sh("docker", "image", "inspect", image, check=False).returncode != 0:
            check(f"run: image {image} exists (deploy/build-images.sh)", False)
            return
    tag = secrets.token_hex(3)
    work = pathlib.Path(tempfile.mkdtemp(prefix="flotilla-chart-"))
    net = f"flotilla-chart-{tag}"
    containers = []
    uid = 65532
    try:
        sts = by[("StatefulSet", "flotilla-hub")]
        spec = sts["spec"]["template"]["spec"]
        hub = spec["containers"][0]
        ns = "flotilla"
        domain = "cluster.local"
        # The ConfigMap and the CA Secret, as files with the pod's user able to read them.
        for vol in spec["volumes"]:
            mount = next(m for m in hub["volumeMounts"] if m["name"] == vol["name"])
            vol["mountPath"] = mount["mountPath"]
        conf = work / "hub-config"
        conf.mkdir()
        for name, text in by[("ConfigMap", "flotilla-hub")]["data"].items():
            (conf / name).write_text(text)
        ca = work / "ca"
        ca.mkdir()
        os.chown(ca, uid, uid)
        sh("docker", "run", "--rm", "--user", f"{uid}:{uid}", "-v", f"{ca}:/out",
           "flotilla:dev", "ca", "init", "--out", "/out")
        sh("docker", "network", "create", net)

        def volume(name):
            """A directory as Kubernetes gives a volume to a pod with fsGroup: root's, the
            pod's group, setgid, group-writable (docker's tmpfs keeps the image's mode)."""
            d = work / name
            d.mkdir()
            os.chown(d, 0, uid)
            os.chmod(d, 0o2775)
            return d
        service = f"flotilla.{ns}.svc.{domain}"
        replicas = sts["spec"]["replicas"]
        mounts = {"config": conf, "ca": ca}
        hubs = []

        def start_hub(i):
            """Pod i of the StatefulSet: its stable name, the shared config, its own volume."""
            pod = f"flotilla-hub-{i}"
            name = f"{pod}-{tag}"
            args = ["docker", "run", "-d", "--name", name, "--hostname", pod, "--network", net,
                    "--network-alias", f"{pod}.{sts['spec']['serviceName']}.{ns}.svc.{domain}",
                    "--network-alias", service]
            args += docker_args(hub, spec)
            for vol in spec["volumes"]:
                args += ["-v", f"{mounts[vol['name']]}:{vol['mountPath']}:ro"]
            data_mount = next(m for m in hub["volumeMounts"] if m["name"] == "data")["mountPath"]
            args += ["-v", f"{volume(f'{pod}-data')}:{data_mount}"]
            args += [hub["image"]] + hub["args"]
            containers.append(name)
            hubs.append(name)
            sh(*args)

        for i in range(replicas):
            start_hub(i)
        check(f"run: {replicas} hub containers started as rendered", True)

        def ip(name):
            out = sh("docker", "inspect", "-f", "{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}", name)
            return out.stdout.strip()

        http = hub["ports"][2]["containerPort"]
        probe = hub["readinessProbe"]["httpGet"]["path"]

        def ready(name):
            with urllib.request.urlopen(f"http://{ip(name)}:{http}{probe}", timeout=2) as r:
                return r.status == 200

        for name in hubs:
            wait(f"{name} to be ready ({probe})", lambda: ready(name))
        check("run: every hub passes its readiness probe (a leader with a quorum)", True)

        def token():
            for name in hubs:
                r = sh("docker", "exec", name, "/flotilla", "admin-token", "--data-dir", "/data/hub", check=False)
                if r.returncode == 0:
                    return r.stdout.strip()
            return None

        admin = wait("an admin token on the first leader", token)
        api = f"https://{service}:{hub['ports'][0]['containerPort']}"

        def client(*cmd):
            # The token goes through the environment, never on a command line or in a log.
            return sh("docker", "run", "--rm", "--network", net, "-v", f"{ca}:/ca:ro",
                      "-e", f"FLOTILLA_HUB={api}", "-e", "FLOTILLA_CA=/ca/ca.pem",
                      "-e", "FLOTILLA_TOKEN", "flotilla:dev", *cmd,
                      env={**os.environ, "FLOTILLA_TOKEN": admin})

        status = json.loads(client("cluster", "status", "-o", "json").stdout)
        members = sorted(m["id"] for m in status["members"])
        check("run: the hubs form one cluster with a leader",
              members == list(range(1, replicas + 1)) and status["leader_id"] in members, json.dumps(status))

        # A node from the rendered Deployment, joining with a token from the cluster.
        # Trusted to bring its tools (the demo server's are new to the cluster).
        join = client("token", "create", "--uses", "10", "--ttl", "600", "--may-add-tools").stdout.strip()
        dep = by[("Deployment", "flotilla-node")]
        nspec = dep["spec"]["template"]["spec"]
        node = nspec["containers"][0]
        nconf = work / "node-config"
        nconf.mkdir()
        for name, text in by[("ConfigMap", "flotilla-node")]["data"].items():
            (nconf / name).write_text(text)
        name = f"flotilla-node-{tag}"
        args = ["docker", "run", "-d", "--name", name, "--hostname", f"flotilla-node-{tag}",
                "--network", net, "-e", "FLOTILLA_JOIN_TOKEN"]
        args += docker_args(node, nspec)
        args += ["-v", f"{nconf}:/etc/flotilla/config:ro"]
        for m in node["volumeMounts"]:
            if m["name"] != "config":
                args += ["-v", f"{volume('node-' + m['name'])}:{m['mountPath']}"]
        args += [node["image"]] + node["args"]
        containers.append(name)
        sh(*args, env={**os.environ, "FLOTILLA_JOIN_TOKEN": join})
        out = wait("a call through the cluster", lambda: client(
            "call", "echo", "--args", '{"text":"through the chart"}').stdout.strip() == "through the chart")
        check("run: a tool call goes through the rendered hubs to the rendered node", out)

        # `helm upgrade --set hub.replicas=5`: the ConfigMap lists five hubs and two new pods
        # start; they find the running cluster and ask its leader to add them.
        grown = {(d["kind"], d["metadata"]["name"]): d for _, d in scaled}
        for name, text in grown[("ConfigMap", "flotilla-hub")]["data"].items():
            (conf / name).write_text(text)
        more = grown[("StatefulSet", "flotilla-hub")]["spec"]["replicas"]
        for i in range(replicas, more):
            start_hub(i)

        def grown_cluster():
            st = json.loads(client("cluster", "status", "-o", "json").stdout)
            voters = sorted(m["id"] for m in st["members"] if m["role"] in ("leader", "follower"))
            return st if voters == list(range(1, more + 1)) else None
        status = wait(f"{more} voters after scaling up", grown_cluster, timeout=180)
        check(f"run: scaled to {more} replicas, the new hubs join the cluster as voters",
              status["leader_id"] in range(1, more + 1), json.dumps(status))
        for name in hubs[replicas:]:
            wait(f"{name} to be ready ({probe})", lambda: ready(name))
        out = wait("a call after scaling up", lambda: client(
            "call", "echo", "--args", '{"text":"five hubs"}').stdout.strip() == "five hubs")
        check("run: a tool call goes through the grown cluster", out)
    except Exception as e:  # noqa: BLE001 - reported as the failure, with the hubs' logs
        check("run: the rendered StatefulSet forms a cluster that serves a call", False, str(e))
        for name in containers:
            print(f"--- {name} ---\n" + sh("docker", "logs", "--tail", "30", name, check=False).stderr)
    finally:
        for name in containers:
            sh("docker", "rm", "-f", name, check=False)
        sh("docker", "network", "rm", net, check=False)
        shutil.rmtree(work, ignore_errors=True)


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
    monitor = next(d for _, d in prod if d["kind"] == "ServiceMonitor")
    want = monitor["spec"]["selector"]["matchLabels"]
    picked = [d["metadata"]["name"] for _, d in prod if d["kind"] == "Service"
              and all(d["metadata"]["labels"].get(k) == v for k, v in want.items())]
    check("production: the ServiceMonitor scrapes each hub once (one Service)", picked == ["flotilla-hubs"], str(picked))
    node_toml = next(d for _, d in prod if d["kind"] == "ConfigMap" and d["metadata"]["name"] == "flotilla-node")["data"]["node.toml"]
    import tomllib
    servers = tomllib.loads(node_toml.replace("${HOSTNAME}", "n").replace("${FLOTILLA_JOIN_TOKEN}", "t"))["servers"]
    check("production: a server's env renders as a table", servers[0].get("env") == {"TZ": "${TZ}"}, node_toml)
    # A CA rotation's overlap: the bundle from the CA Secret is trusted.
    rotating = render({"ca": {"secretName": "flotilla-ca-next", "trustKey": "ca-both.pem"}}, "rotating the CA")
    cm = next(d for _, d in rotating if d["kind"] == "ConfigMap" and d["metadata"]["name"] == "flotilla-hub")
    trusted = tomllib.loads(cm["data"]["hub.toml"].replace("${HOSTNAME}", "flotilla-hub-0")).get("ca_trust")
    check("rotating the CA: hub.toml trusts the Secret's bundle", trusted == "/etc/flotilla/ca/ca-both.pem", str(trusted))
    sts = next(d for _, d in rotating if d["kind"] == "StatefulSet")
    secret = [v["secret"]["secretName"] for v in sts["spec"]["template"]["spec"]["volumes"] if "secret" in v]
    check("rotating the CA: hubs mount the named CA Secret", "flotilla-ca-next" in secret, str(secret))
    named = render({"hub": {"extraTlsNames": ["flotilla.example.com"]}}, "extra certificate names")
    cm = next(d for _, d in named if d["kind"] == "ConfigMap" and d["metadata"]["name"] == "flotilla-hub")
    names = tomllib.loads(cm["data"]["hub.toml"].replace("${HOSTNAME}", "flotilla-hub-0")).get("tls_names", [])
    check("extra certificate names: in hub.toml tls_names", "flotilla.example.com" in names, str(names))
    # Values the schema must refuse.
    chart = helm.Chart.load(str(CHART))
    for bad, why in [({"hub": {"replicas": 2}}, "an even number of hubs"),
                     ({"ca": {"secretName": "c", "trustKey": "../etc/passwd"}}, "a CA bundle key that is a path"),
                     ({"node": {"kind": "StatefulSet"}}, "an unknown node kind"),
                     ({"hubs": 3}, "an unknown key"),
                     ({"hub": {"settings": {"tls_names": ["x"]}}}, "a hub.toml key the chart sets, in settings")]:
        try:
            chart.validate_schema(bad)
            check(f"schema refuses {why}", False, "accepted")
        except helm.HelmError:
            check(f"schema refuses {why}", True)
    if "--run" in sys.argv[1:]:
        run_for_real(default, render({"hub": {"replicas": 5}}, "five hubs"))
    print(f"chart: {len(failures)} failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
