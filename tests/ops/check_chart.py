#!/usr/bin/env python3
"""Checks the Helm chart helm/clipstream without a cluster or a helm binary.

    .cache/ops-venv/bin/python tests/ops/check_chart.py \\
        [--clipstream-bin target/release/clipstream] [--validate-mode auto|require|skip]

(scripts/check-ops.sh sets up the venv from tests/ops/requirements.txt.)

1. `helm lint --strict` (Helm's own Go code through helm-python-sdk).
2. Renders the chart with its defaults and with every helm/clipstream/ci/*-values.yaml
   (Helm validates values.schema.json while rendering), then for each scenario:
   - every manifest against the Kubernetes OpenAPI schemas of each
     --kube-versions (kubernetes-validate, strict: unknown fields are errors);
   - CRDs (ServiceMonitor, ScaledObject, TriggerAuthentication) are not in
     those schemas: they get a hand-written structural check of the fields
     this chart sets (types, required keys, KEDA's string-only metadata, enum
     values). That is NOT the CRDs' own OpenAPI schema; it is said so in the output;
   - references between objects: selectors match the pod labels, ports exist
     by name, scale targets and ConfigMaps and TriggerAuthentications exist,
     checksum/config is the hash of the rendered ConfigMap;
   - the pod: non-root, read-only root filesystem with an emptyDir on /tmp,
     /healthz liveness, /readyz readiness, grace period above the drain
     deadline, the metrics port, GPU limits when gpu.enabled;
   - the pipeline TOML from the ConfigMap: parses (tomllib), integers are
     integers, every `${VAR}` without a default is set in the container's env;
     then `clipstream validate` on it, with those variables set to dummies.
3. Values that must be rejected (schema or template `fail`), each with the
   message it must show.

--validate-mode (or CLIPSTREAM_VALIDATE): `require` fails on any problem
`clipstream validate` reports; `auto` (default) does the same, except that a
binary that does not know `kind = "kafka"` yet is reported as SKIPPED (not a
failure) with its message; `skip` does not run it. --clipstream-bin (or
CLIPSTREAM_BIN) is the binary; without one the step is skipped (said so).

Exit status: 0 all checks passed, 1 some failed (listed at the end), 2 set-up problem.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import subprocess
import sys
import tempfile
import time
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent.parent
CHART = ROOT / "helm" / "clipstream"
REQUIRED_SCENARIOS = ("gpu", "autoscaling", "s3-sasl", "nightly")
RELEASE, NAMESPACE = "ops-check", "ml"

try:
    import helm_python as helm
    import jsonschema
    import kubernetes_validate
    import yaml
except ImportError as e:  # pragma: no cover - set-up problem
    sys.exit(f"check_chart.py: {e}: run it with the ops venv (scripts/check-ops.sh creates .cache/ops-venv)")


# --------------------------------------------------------------------------
# Structural checks of the CRDs this chart renders (not in kubernetes-validate).

STR = {"type": "string", "minLength": 1}
INT = {"type": "integer"}
META = {
    "type": "object",
    "required": ["name", "namespace"],
    "properties": {"name": {"type": "string", "pattern": "^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$", "maxLength": 253},
                   "namespace": STR, "labels": {"type": "object", "additionalProperties": {"type": "string"}},
                   "annotations": {"type": "object", "additionalProperties": {"type": "string"}}},
}
DURATION = {"type": "string", "pattern": "^([0-9]+(ms|s|m|h|d|w|y))+$"}
NUMSTR = {"type": "string", "pattern": "^[0-9]+$"}
KAFKA_METADATA = {
    "type": "object",
    "additionalProperties": False,
    "required": ["bootstrapServers", "consumerGroup", "lagThreshold"],
    "properties": {
        "bootstrapServers": STR, "consumerGroup": STR, "topic": STR, "lagThreshold": NUMSTR,
        "activationLagThreshold": NUMSTR, "offsetResetPolicy": {"enum": ["earliest", "latest"]},
        "allowIdleConsumers": {"enum": ["true", "false"]}, "limitToPartitionsWithLag": {"enum": ["true", "false"]},
        "scaleToZeroOnInvalidOffset": {"enum": ["true", "false"]}, "excludePersistentLag": {"enum": ["true", "false"]},
        "sasl": {"enum": ["none", "plaintext", "scram_sha256", "scram_sha512", "oauthbearer", "gssapi"]},
        "tls": {"enum": ["enable", "disable"]}, "version": STR, "partitionLimitation": STR,
    },
}
CRD_SCHEMAS = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"): {
        "type": "object", "additionalProperties": False, "required": ["apiVersion", "kind", "metadata", "spec"],
        "properties": {"apiVersion": STR, "kind": STR, "metadata": META, "spec": {
            "type": "object", "additionalProperties": False, "required": ["selector", "endpoints"],
            "properties": {
                "jobLabel": STR,
                "selector": {"type": "object", "additionalProperties": False, "properties": {
                    "matchLabels": {"type": "object", "additionalProperties": {"type": "string"}}, "matchExpressions": {"type": "array"}}},
                "namespaceSelector": {"type": "object", "additionalProperties": False, "properties": {
                    "any": {"type": "boolean"}, "matchNames": {"type": "array", "items": STR}}},
                "endpoints": {"type": "array", "minItems": 1, "items": {
                    "type": "object", "additionalProperties": False, "required": ["port"],
                    "properties": {"port": STR, "path": {"type": "string", "pattern": "^/"}, "scheme": {"enum": ["http", "https"]},
                                   "interval": DURATION, "scrapeTimeout": DURATION, "honorLabels": {"type": "boolean"},
                                   "relabelings": {"type": "array", "items": {"type": "object"}},
                                   "metricRelabelings": {"type": "array", "items": {"type": "object"}}}}}}}}},
    ("keda.sh/v1alpha1", "ScaledObject"): {
        "type": "object", "additionalProperties": False, "required": ["apiVersion", "kind", "metadata", "spec"],
        "properties": {"apiVersion": STR, "kind": STR, "metadata": META, "spec": {
            "type": "object", "additionalProperties": False, "required": ["scaleTargetRef", "triggers"],
            "properties": {
                "scaleTargetRef": {"type": "object", "additionalProperties": False, "required": ["name"],
                                   "properties": {"apiVersion": STR, "kind": STR, "name": STR, "envSourceContainerName": STR}},
                "pollingInterval": {**INT, "minimum": 1}, "cooldownPeriod": {**INT, "minimum": 0},
                "minReplicaCount": {**INT, "minimum": 0}, "maxReplicaCount": {**INT, "minimum": 1},
                "idleReplicaCount": {**INT, "minimum": 0},
                "fallback": {"type": "object", "additionalProperties": False, "required": ["failureThreshold", "replicas"],
                             "properties": {"failureThreshold": {**INT, "minimum": 1}, "replicas": {**INT, "minimum": 0},
                                            "behavior": {"enum": ["static", "currentReplicas", "currentReplicasIfHigher", "currentReplicasIfLower"]}}},
                "advanced": {"type": "object", "additionalProperties": False, "properties": {
                    "restoreToOriginalReplicaCount": {"type": "boolean"},
                    "horizontalPodAutoscalerConfig": {"type": "object", "additionalProperties": False, "properties": {
                        "name": STR, "behavior": {"type": "object", "additionalProperties": False,
                                                  "properties": {"scaleUp": {"type": "object"}, "scaleDown": {"type": "object"}}}}}}},
                "triggers": {"type": "array", "minItems": 1, "items": {
                    "type": "object", "additionalProperties": False, "required": ["type", "metadata"],
                    "properties": {"type": {"const": "kafka"}, "name": STR, "useCachedMetrics": {"type": "boolean"},
                                   "metricType": {"enum": ["AverageValue", "Value", "Utilization"]},
                                   "authenticationRef": {"type": "object", "additionalProperties": False, "required": ["name"],
                                                         "properties": {"name": STR, "kind": {"enum": ["TriggerAuthentication", "ClusterTriggerAuthentication"]}}},
                                   "metadata": KAFKA_METADATA}}}}}}},
    ("keda.sh/v1alpha1", "TriggerAuthentication"): {
        "type": "object", "additionalProperties": False, "required": ["apiVersion", "kind", "metadata", "spec"],
        "properties": {"apiVersion": STR, "kind": STR, "metadata": META, "spec": {
            "type": "object", "additionalProperties": False, "minProperties": 1,
            "properties": {"secretTargetRef": {"type": "array", "minItems": 1, "items": {
                "type": "object", "additionalProperties": False, "required": ["parameter", "name", "key"],
                "properties": {"parameter": {"enum": ["username", "password", "sasl", "tls", "ca", "cert", "key", "keyPassword"]},
                               "name": STR, "key": STR}}}}}}},
}


# --------------------------------------------------------------------------

class Checks:
    def __init__(self) -> None:
        self.failures: list[str] = []
        self.count = 0

    def ok(self, cond: bool, what: str, detail: str = "") -> bool:
        self.count += 1
        if cond:
            return True
        self.failures.append(what + (f": {detail}" if detail else ""))
        print(f"    FAIL {what}" + (f": {detail}" if detail else ""))
        return False


def load_values(path: Path | None) -> dict:
    if path is None:
        return {}
    return yaml.safe_load(path.read_text(encoding="utf-8")) or {}


def deep_merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def matches(selector: dict, labels: dict) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def render(chart, values: dict) -> dict[str, str]:
    return chart.render(values, name=RELEASE, namespace=NAMESPACE)


def manifests(rendered: dict[str, str]) -> list[tuple[str, dict]]:
    out = []
    for path, text in sorted(rendered.items()):
        if not path.endswith((".yaml", ".yml")):
            continue
        for doc in yaml.safe_load_all(text):
            if doc:
                out.append((path.split("/templates/", 1)[-1], doc))
    return out


def find(docs, kind: str) -> list[dict]:
    return [d for _, d in docs if d.get("kind") == kind]


def env_refs(toml_text: str) -> set[str]:
    """${VAR} references without a default."""
    return {m.group(1) for m in re.finditer(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}", toml_text)}


def check_toml_types(node, path, c: Checks, label: str) -> None:
    """Integers of the chart's values arrive as float64 in Helm: none may leak out as floats."""
    float_ok = {"shutdown.drain_deadline_secs", "model.review_min_score", "model.review_min_margin"}
    if isinstance(node, dict):
        for k, v in node.items():
            check_toml_types(v, f"{path}.{k}" if path else k, c, label)
    elif isinstance(node, list):
        for i, v in enumerate(node):
            check_toml_types(v, f"{path}[{i}]", c, label)
    elif isinstance(node, float) and path not in float_ok:
        c.ok(False, f"{label}: pipeline.toml {path}", f"{node!r} is a float, expected an integer")
    elif isinstance(node, str) and re.fullmatch(r"-?[0-9.]+e[-+]?[0-9]+", node):
        c.ok(False, f"{label}: pipeline.toml {path}", f"{node!r}: a number from the values was written in e-notation")


KAFKA_PROBE = """
[model]
dir = "/models/clip"
[source]
kind = "kafka"
brokers = "kafka:9092"
topics = ["t"]
group_id = "g"
[sink.parquet]
dir = "/tmp/out"
"""


KNOWS_KAFKA: dict[str, tuple[bool, str]] = {}


def knows_kafka(binary: str) -> tuple[bool, str]:
    """Whether `clipstream validate` knows `kind = "kafka"` at all. The probe is
    otherwise a valid files-mode config, so that a binary from before the
    Kafka source reports exactly that (serde stops at its first problem)."""
    with tempfile.TemporaryDirectory(prefix="clipstream-probe-") as tmp:
        path = Path(tmp, "probe.toml")
        path.write_text(KAFKA_PROBE, encoding="utf-8")
        cp = subprocess.run([binary, "validate", str(path)], capture_output=True, text=True, timeout=60)
    out = (cp.stdout + cp.stderr).strip().replace(str(path), "<probe>.toml")
    m = re.search(r"unknown variant `kafka`[^\n]*", out)
    return (m is None, m.group(0) if m else out)


VALIDATE = {"ran": 0, "skipped": 0, "why": ""}


def run_validate(c: Checks, label: str, toml_text: str, labels_text: str | None, env_names: set[str],
                 binary: str | None, mode: str) -> None:
    if mode == "skip" or not binary:
        VALIDATE["skipped"] += 1
        VALIDATE["why"] = "--validate-mode skip" if mode == "skip" else "no binary: pass --clipstream-bin or set CLIPSTREAM_BIN"
        print(f"    clipstream validate: SKIPPED ({VALIDATE['why']})")
        return
    if mode == "auto":
        if binary not in KNOWS_KAFKA:
            KNOWS_KAFKA[binary] = knows_kafka(binary)
        known, why = KNOWS_KAFKA[binary]
        if not known:
            VALIDATE["skipped"] += 1
            VALIDATE["why"] = f"{binary} does not accept kind = \"kafka\" yet"
            print(f"    clipstream validate: SKIPPED: {binary} does not accept `kind = \"kafka\"` yet ({why}); "
                  "--validate-mode require makes this a failure")
            return
    with tempfile.TemporaryDirectory(prefix="clipstream-chart-") as tmp:
        path = Path(tmp, f"{label}.toml")
        path.write_text(toml_text, encoding="utf-8")
        if labels_text is not None:
            Path(tmp, "labels.toml").write_text(labels_text, encoding="utf-8")
        env = {k: v for k, v in os.environ.items() if k in ("PATH", "HOME", "LANG", "LC_ALL", "TMPDIR")}
        for name in env_names:
            env[name] = f"check-{name.lower()}"
        try:
            VALIDATE["ran"] += 1
            cp = subprocess.run([binary, "validate", str(path)], capture_output=True, text=True, env=env, timeout=60)
        except OSError as e:
            c.ok(False, f"{label}: clipstream validate", f"cannot run {binary}: {e}")
            return
    out = (cp.stdout + cp.stderr).strip().replace(str(path), f"<{label}>/pipeline.toml")
    if cp.returncode == 0:
        print(f"    clipstream validate: ok ({out.splitlines()[-1] if out else 'exit 0'})")
        return
    indented = "\n".join("        " + line for line in out.splitlines())
    print(f"    clipstream validate: exit {cp.returncode}\n{indented}")
    c.ok(False, f"{label}: clipstream validate", f"exit {cp.returncode}: {out.splitlines()[-1] if out else ''}")


def check_scenario(chart, label: str, values: dict, defaults: dict, kube_versions: list[str], binary: str | None,
                   mode: str, c: Checks) -> None:
    print(f"\n== scenario {label}")
    merged = deep_merge(defaults, values)
    try:
        rendered = render(chart, values)
    except helm.HelmError as e:
        c.ok(False, f"{label}: render", str(e).strip())
        return
    docs = manifests(rendered)
    kinds = sorted(f"{d['kind']}/{d['metadata']['name']}" for _, d in docs)
    print(f"    rendered {len(docs)} objects: {', '.join(kinds)}")
    c.ok("NOTES.txt" in " ".join(rendered) and rendered.get(f"{chart.name}/templates/NOTES.txt", "").strip() != "",
         f"{label}: NOTES.txt renders")

    # 1. Kubernetes schemas (strict) / CRD structure.
    crd_kinds = set()
    for src, d in docs:
        key = (d.get("apiVersion"), d.get("kind"))
        where = f"{label}: {src} {d.get('kind')}/{d.get('metadata', {}).get('name')}"
        if key in CRD_SCHEMAS:
            crd_kinds.add(d["kind"])
            errs = sorted(jsonschema.Draft7Validator(CRD_SCHEMAS[key]).iter_errors(d), key=lambda e: list(e.path))
            for e in errs:
                c.ok(False, f"{where} (structural CRD check)", f"{'.'.join(map(str, e.path))}: {e.message}")
            if not errs:
                c.ok(True, where)
            continue
        for v in kube_versions:
            try:
                kubernetes_validate.validate(d, v, strict=True)
                c.ok(True, where)
            except kubernetes_validate.ValidationError as e:
                c.ok(False, f"{where} (Kubernetes {v}, strict)", f"{'.'.join(map(str, e.path))}: {e.message}")
            except kubernetes_validate.SchemaNotFoundError as e:
                c.ok(False, f"{where} (Kubernetes {v})", f"{e.message}: neither a Kubernetes kind nor a known CRD")
    print(f"    Kubernetes {', '.join(kube_versions)} strict schemas: {len(docs) - sum(1 for _, d in docs if (d.get('apiVersion'), d.get('kind')) in CRD_SCHEMAS)} objects"
          + (f"; structural check only (not the CRD's OpenAPI schema): {', '.join(sorted(crd_kinds))}" if crd_kinds else ""))

    # 2. References and the pod.
    deps = find(docs, "Deployment")
    if not c.ok(len(deps) == 1, f"{label}: exactly one Deployment"):
        return
    dep = deps[0]
    pod = dep["spec"]["template"]
    pod_labels = pod["metadata"]["labels"]
    spec = pod["spec"]
    ctr = spec["containers"][0]
    c.ok(matches(dep["spec"]["selector"]["matchLabels"], pod_labels), f"{label}: Deployment selector matches its pod labels")
    port_names = {p["name"]: p["containerPort"] for p in ctr.get("ports", [])}
    c.ok(port_names.get("metrics") == merged["metrics"]["port"], f"{label}: container port metrics = metrics.port", str(port_names))
    for svc in find(docs, "Service"):
        c.ok(matches(svc["spec"]["selector"], pod_labels), f"{label}: Service {svc['metadata']['name']} selects the pods")
        for p in svc["spec"]["ports"]:
            c.ok(p["targetPort"] in port_names or p["targetPort"] in port_names.values(),
                 f"{label}: Service port {p['name']} targets a container port", str(p["targetPort"]))
    for sm in find(docs, "ServiceMonitor"):
        svcs = [s for s in find(docs, "Service") if matches(sm["spec"]["selector"]["matchLabels"], s["metadata"]["labels"])]
        c.ok(len(svcs) == 1, f"{label}: ServiceMonitor selects the metrics Service", f"{len(svcs)} Services match")
        for ep in sm["spec"]["endpoints"]:
            c.ok(any(ep["port"] == p["name"] for s in svcs for p in s["spec"]["ports"]), f"{label}: ServiceMonitor port {ep['port']} exists on the Service")
    for pdb in find(docs, "PodDisruptionBudget"):
        c.ok(matches(pdb["spec"]["selector"]["matchLabels"], pod_labels), f"{label}: PodDisruptionBudget selects the pods")
    for kind in ("ScaledObject", "HorizontalPodAutoscaler"):
        for o in find(docs, kind):
            ref = o["spec"]["scaleTargetRef"]
            c.ok(ref.get("kind", "Deployment") == "Deployment" and ref["name"] == dep["metadata"]["name"],
                 f"{label}: {kind} targets the Deployment", str(ref))
            c.ok("replicas" not in dep["spec"], f"{label}: Deployment leaves replicas to the {kind}")
    for so in find(docs, "ScaledObject"):
        auths = {a["metadata"]["name"] for a in find(docs, "TriggerAuthentication")}
        for t in so["spec"]["triggers"]:
            if "authenticationRef" in t:
                c.ok(t["authenticationRef"]["name"] in auths, f"{label}: ScaledObject's TriggerAuthentication exists", t["authenticationRef"]["name"])
        topics = sorted(t["metadata"].get("topic") for t in so["spec"]["triggers"])
        c.ok(topics == sorted(merged["pipeline"]["source"]["topics"]), f"{label}: one kafka trigger per topic", str(topics))
        idle = so["spec"].get("idleReplicaCount")
        c.ok(idle is None or idle < so["spec"].get("minReplicaCount", 0), f"{label}: idleReplicaCount below minReplicaCount")
    cms = {cm["metadata"]["name"]: cm for cm in find(docs, "ConfigMap")}
    for vol in spec.get("volumes", []):
        if "configMap" in vol:
            c.ok(vol["configMap"]["name"] in cms, f"{label}: volume {vol['name']} names a rendered ConfigMap")
    config_src = rendered[f"{chart.name}/templates/configmap.yaml"]
    c.ok(pod["metadata"]["annotations"].get("checksum/config") == hashlib.sha256(config_src.encode()).hexdigest(),
         f"{label}: checksum/config is the hash of the rendered ConfigMap")

    psc, csc = spec.get("securityContext", {}), ctr.get("securityContext", {})
    c.ok(psc.get("runAsNonRoot") is True or csc.get("runAsNonRoot") is True, f"{label}: runAsNonRoot")
    c.ok(csc.get("readOnlyRootFilesystem") is True, f"{label}: readOnlyRootFilesystem")
    c.ok(csc.get("allowPrivilegeEscalation") is False, f"{label}: allowPrivilegeEscalation false")
    tmp_vols = {v["name"] for v in spec.get("volumes", []) if "emptyDir" in v}
    c.ok(any(m["mountPath"] == "/tmp" and m["name"] in tmp_vols for m in ctr.get("volumeMounts", [])), f"{label}: emptyDir on /tmp")
    c.ok(ctr.get("livenessProbe", {}).get("httpGet", {}).get("path") == "/healthz", f"{label}: liveness on /healthz")
    c.ok(ctr.get("readinessProbe", {}).get("httpGet", {}).get("path") == "/readyz", f"{label}: readiness on /readyz")
    drain = merged["pipeline"]["shutdown"]["drain_deadline_secs"]
    grace = spec.get("terminationGracePeriodSeconds")
    c.ok(isinstance(grace, int) and grace > drain, f"{label}: terminationGracePeriodSeconds {grace} > drain deadline {drain}")
    limits = ctr.get("resources", {}).get("limits", {})
    gpu = merged["gpu"]
    if gpu["enabled"]:
        c.ok(limits.get(gpu["resourceName"]) == gpu["count"], f"{label}: {gpu['resourceName']} limit = {gpu['count']}", str(limits))
    else:
        c.ok(gpu["resourceName"] not in limits, f"{label}: no GPU requested")
    model_mounts = [m for m in ctr.get("volumeMounts", []) if m["mountPath"] == merged["pipeline"]["model"]["dir"]]
    c.ok(bool(model_mounts) == (merged["model"]["source"] != "image"), f"{label}: model volume mounted at pipeline.model.dir only when model.source is not image")
    check_nightly(c, label, docs, merged, binary, rendered, chart)
    if any(d["kind"] == "ConfigMap" and "-dashboard-" in d["metadata"]["name"] for _, d in docs):
        for cm in (d for _, d in docs if d["kind"] == "ConfigMap" and "-dashboard-" in d["metadata"]["name"]):
            c.ok(all(cm["metadata"]["labels"].get(k) == v for k, v in merged["dashboards"]["labels"].items()),
                 f"{label}: dashboard ConfigMap {cm['metadata']['name']} has the sidecar label")
            for name, text in cm["data"].items():
                src = (ROOT / "dashboards" / name).read_text(encoding="utf-8")
                c.ok(text == src, f"{label}: dashboard {name} in the chart equals dashboards/{name}")

    # 3. The pipeline TOML.
    cm = cms.get(f"{dep['metadata']['name']}-config")
    if not c.ok(cm is not None and "pipeline.toml" in cm["data"], f"{label}: ConfigMap with pipeline.toml"):
        return
    toml_text = cm["data"]["pipeline.toml"]
    try:
        parsed = tomllib.loads(toml_text)
    except tomllib.TOMLDecodeError as e:
        c.ok(False, f"{label}: pipeline.toml parses", str(e))
        return
    c.ok(True, f"{label}: pipeline.toml parses")
    check_toml_types(parsed, "", c, label)
    c.ok(parsed["source"]["kind"] == "kafka" and parsed["metrics"]["listen"].endswith(f":{merged['metrics']['port']}"),
         f"{label}: [source] kind kafka, [metrics] listen on metrics.port")
    providers = parsed["runtime"]["providers"]
    c.ok(all(isinstance(p, dict) and p.get("kind") in ("cpu", "cuda", "tensorrt") for p in providers),
         f"{label}: [runtime] providers are tables tagged by kind", str(providers))
    # The format goes with the embeddings topic: none without it.
    topic = merged["pipeline"]["sink"]["kafka"].get("embeddings_topic")
    fmt = (merged["pipeline"]["sink"]["kafka"].get("embeddings_format") or "json") if topic else "json"
    written = parsed.get("sink", {}).get("kafka", {}).get("embeddings_format", "json")
    c.ok(written == fmt, f"{label}: [sink.kafka] embeddings_format is the values' ({fmt})", f"written: {written}")
    refs = env_refs(toml_text)
    env_names = {e["name"] for e in ctr.get("env", [])}
    missing = sorted(refs - env_names)
    c.ok(not missing or bool(ctr.get("envFrom")), f"{label}: every ${{VAR}} of pipeline.toml is in the container env",
         f"missing: {', '.join(missing)}")
    if merged["kafka"]["sasl"]["enabled"]:
        for section in ("source", "sink.kafka"):
            node = parsed
            for part in section.split("."):
                node = node.get(part, {})
            opts = node.get("options", {})
            c.ok(opts.get("sasl.username") == "${KAFKA_USERNAME}" and opts.get("sasl.password") == "${KAFKA_PASSWORD}"
                 and opts.get("security.protocol") == merged["kafka"]["sasl"]["securityProtocol"],
                 f"{label}: [{section}.options] carries SASL from ${{KAFKA_USERNAME}} / ${{KAFKA_PASSWORD}}")
        secret_env = {e["name"]: e["valueFrom"]["secretKeyRef"]["name"] for e in ctr["env"] if "secretKeyRef" in e.get("valueFrom", {})}
        c.ok(secret_env.get("KAFKA_USERNAME") == merged["kafka"]["sasl"]["existingSecret"], f"{label}: KAFKA_USERNAME from the Secret")
    if merged["s3"]["credentials"]["existingSecret"]:
        secret_env = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in ctr["env"] if "secretKeyRef" in e.get("valueFrom", {})}
        c.ok(all(secret_env.get(k, {}).get("name") == merged["s3"]["credentials"]["existingSecret"] for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")),
             f"{label}: AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY from the Secret")
    labels_text = cm["data"].get("labels.toml")
    if labels_text is not None:
        c.ok(parsed["model"].get("labels") == "/config/labels.toml", f"{label}: [model] labels points at the mounted labels.toml")
        try:
            tomllib.loads(labels_text)
        except tomllib.TOMLDecodeError as e:
            c.ok(False, f"{label}: labels.toml parses", str(e))
    run_validate(c, label, toml_text, labels_text, refs, binary, mode)


def check_nightly(c: Checks, label: str, docs, merged: dict, binary: str | None, rendered: dict, chart) -> None:
    """The nightly CronJob: present exactly when nightly.enabled; its pods are
    not the workers' (no selector picks them up), run `clipstream night` on
    the rendered pipeline with flags the binary knows, never two at once,
    and are not killed while they wait for the fleet."""
    jobs = find(docs, "CronJob")
    n = merged["nightly"]
    if not c.ok(len(jobs) == (1 if n["enabled"] else 0), f"{label}: a nightly CronJob exactly when nightly.enabled", str(len(jobs))):
        return
    if not jobs:
        return
    cj = jobs[0]
    job = cj["spec"]["jobTemplate"]["spec"]
    pod = job["template"]
    spec = pod["spec"]
    ctr = spec["containers"][0]
    labels = pod["metadata"]["labels"]
    selectors = [("Deployment", d["spec"]["selector"]["matchLabels"]) for d in find(docs, "Deployment")]
    selectors += [("Service", s["spec"]["selector"]) for s in find(docs, "Service")]
    selectors += [("PodDisruptionBudget", p["spec"]["selector"]["matchLabels"]) for p in find(docs, "PodDisruptionBudget")]
    for kind, sel in selectors:
        c.ok(not matches(sel, labels), f"{label}: the {kind} does not select the nightly job's pods", str(sel))
    c.ok(cj["spec"]["concurrencyPolicy"] == "Forbid", f"{label}: never two nights at once (concurrencyPolicy Forbid)")
    c.ok(spec["restartPolicy"] == "Never", f"{label}: nightly pods are not restarted in place")
    args = ctr["args"]
    c.ok(args[0] == "night", f"{label}: the job runs `clipstream night`", str(args[:1]))
    flag = lambda f: args[args.index(f) + 1] if f in args else None  # noqa: E731
    c.ok(flag("--pipeline") == "/config/pipeline.toml", f"{label}: the job reads the rendered pipeline")
    c.ok(flag("--catalog") == n["catalog"] and flag("--snapshots") == n["snapshots"], f"{label}: catalog and snapshots as given")
    wait = int(flag("--wait") or 0)
    deadline = spec.get("activeDeadlineSeconds")
    c.ok(wait == n["waitSeconds"] and isinstance(deadline, int) and deadline > wait and "activeDeadlineSeconds" not in job,
         f"{label}: each pod's activeDeadlineSeconds {deadline} above the wait {wait} (not the Job's: retries get it again)")
    c.ok((flag("--spool") or "").startswith("/work"), f"{label}: the job spools S3 folders on its work volume, not /tmp", str(flag("--spool")))
    c.ok(spec.get("nodeSelector", {}) == n["nodeSelector"] and spec.get("tolerations", []) == n["tolerations"],
         f"{label}: the job's placement is nightly's own, not the workers'")
    env_names = {e["name"] for e in ctr.get("env", [])}
    config_text = next((d["data"]["pipeline.toml"] for _, d in docs if d["kind"] == "ConfigMap" and "pipeline.toml" in d.get("data", {})), "")
    missing = sorted(env_refs(config_text) - env_names)
    c.ok(not missing or bool(ctr.get("envFrom")), f"{label}: every ${{VAR}} of pipeline.toml is in the job's env", str(missing))
    extra = merged.get("extraVolumeMounts") or []
    c.ok(all(m in ctr.get("volumeMounts", []) for m in extra), f"{label}: the job has the workers' extraVolumeMounts")
    mounts = {m["mountPath"]: m["name"] for m in ctr.get("volumeMounts", [])}
    vols = {v["name"]: v for v in spec.get("volumes", [])}
    c.ok(all(mounts.get(p) in vols for p in ("/config", "/tmp", "/work")), f"{label}: /config, /tmp and /work are mounted volumes", str(mounts))
    c.ok(vols.get(mounts.get("/config"), {}).get("configMap", {}).get("name") in {m["metadata"]["name"] for m in find(docs, "ConfigMap")},
         f"{label}: the job's /config is the rendered ConfigMap")
    if n["workVolume"]:
        c.ok({k: v for k, v in vols[mounts["/work"]].items() if k != "name"} == n["workVolume"], f"{label}: /work is nightly.workVolume")
    model_mounted = merged["pipeline"]["model"]["dir"] in mounts
    c.ok(model_mounted == (merged["model"]["source"] != "image"), f"{label}: the job sees the model (plan fingerprints it)")
    csc = ctr.get("securityContext", {})
    c.ok(csc.get("readOnlyRootFilesystem") is True and spec.get("securityContext", {}).get("runAsNonRoot") is True,
         f"{label}: the job runs non-root on a read-only root filesystem")
    config_src = rendered[f"{chart.name}/templates/configmap.yaml"]
    c.ok(pod["metadata"]["annotations"].get("checksum/config") == hashlib.sha256(config_src.encode()).hexdigest(),
         f"{label}: the job's checksum/config is the hash of the rendered ConfigMap")
    if binary:
        # Every flag the job passes is one `clipstream night` knows.
        cp = subprocess.run([binary, "night", "--help"], capture_output=True, text=True, timeout=60)
        known = set(re.findall(r"--[a-z][a-z-]+", cp.stdout))
        unknown = [a for a in args if a.startswith("--") and a not in known]
        c.ok(cp.returncode == 0 and not unknown, f"{label}: `clipstream night` knows every flag of the job", str(unknown or cp.stderr[-200:]))
    else:
        print(f"    {label}: the job's flags are not checked against a binary (none given)")


# Values that must be rejected, and a piece of the message each must show.
BAD_VALUES = [
    ("replicaCount: -1", {"replicaCount": -1}, "at '/replicaCount': minimum"),
    ("unknown top-level key", {"replicaCont": 3}, "additional properties 'replicaCont' not allowed"),
    ("unknown pipeline key", {"pipeline": {"source": {"topic": "x"}}}, "additional properties 'topic' not allowed"),
    ("embeddings format msgpack", {"pipeline": {"sink": {"kafka": {"embeddings_format": "msgpack"}}}}, "value must be one of 'json', 'f32le'"),
    ("grace period below the drain deadline", {"terminationGracePeriodSeconds": 10}, "terminationGracePeriodSeconds (10) must be greater than pipeline.shutdown.drain_deadline_secs (20)"),
    ("grace period equal to the drain deadline", {"terminationGracePeriodSeconds": 30, "pipeline": {"shutdown": {"drain_deadline_secs": 30}}}, "must be greater than pipeline.shutdown.drain_deadline_secs (30)"),
    ("bad provider name", {"pipeline": {"runtime": {"providers": ["cuda", "gpu"]}}}, "value must be one of 'cpu', 'cuda', 'tensorrt'"),
    ("bad provider kind (table form)", {"pipeline": {"runtime": {"providers": [{"kind": "rocm"}]}}}, "/pipeline/runtime/providers/0"),
    ("no providers", {"pipeline": {"runtime": {"providers": []}}}, "minItems"),
    ("bad model variant", {"pipeline": {"model": {"variant": "fp8"}}}, "/pipeline/model/variant"),
    ("auto_offset_reset smallest", {"pipeline": {"source": {"auto_offset_reset": "smallest"}}}, "value must be one of 'earliest', 'latest'"),
    ("topic with a space", {"pipeline": {"source": {"topics": ["image events"]}}}, "/pipeline/source/topics/0"),
    ("rebalance drain not below session timeout", {"pipeline": {"source": {"drain_deadline_ms": 45000}}}, "drain_deadline_ms (45000) must be below pipeline.source.session_timeout_ms (45000)"),
    ("fetch scheme file", {"pipeline": {"fetch": {"allowed_schemes": ["file"]}}}, "/pipeline/fetch/allowed_schemes/0"),
    ("no allowed buckets", {"pipeline": {"fetch": {"allowed_buckets": []}}}, "at '/pipeline/fetch/allowed_buckets': minItems"),
    ("Parquet part_bytes below 5 MiB", {"pipeline": {"sink": {"parquet": {"part_bytes": 1048576}}}}, "/pipeline/sink/parquet/part_bytes"),
    ("SASL without a Secret", {"kafka": {"sasl": {"enabled": True}}}, "kafka.sasl.existingSecret"),
    ("SASL mechanism GSSAPI", {"kafka": {"sasl": {"mechanism": "GSSAPI"}}}, "/kafka/sasl/mechanism"),
    ("Parquet url and dir", {"pipeline": {"sink": {"parquet": {"dir": "/out"}}}}, "not both"),
    ("Parquet url not s3://", {"pipeline": {"sink": {"parquet": {"url": "gs://bucket/x"}}}}, "/pipeline/sink/parquet/url"),
    ("model PVC without a claim", {"model": {"source": "pvc"}}, "model.pvc.claimName"),
    ("model dir relative", {"pipeline": {"model": {"dir": "models/clip"}}}, "/pipeline/model/dir"),
    ("gpu.count 0", {"gpu": {"enabled": True, "count": 0}}, "at '/gpu/count': minimum"),
    ("metrics.port 80", {"metrics": {"port": 80}}, "at '/metrics/port': minimum"),
    ("image.pullPolicy Sometimes", {"image": {"pullPolicy": "Sometimes"}}, "/image/pullPolicy"),
    ("drain deadline 0", {"pipeline": {"shutdown": {"drain_deadline_secs": 0}}}, "/pipeline/shutdown/drain_deadline_secs"),
    ("autoscaling min above max", {"autoscaling": {"enabled": True, "minReplicas": 5, "maxReplicas": 2}}, "autoscaling.minReplicas (5) is above autoscaling.maxReplicas (2)"),
    ("autoscaling kind", {"autoscaling": {"kind": "vpa"}}, "value must be one of 'keda', 'hpa'"),
    ("KEDA idle not below min", {"autoscaling": {"enabled": True, "minReplicas": 0, "keda": {"idleReplicaCount": 0}}}, "idleReplicaCount (0) must be below autoscaling.minReplicas (0)"),
    ("HPA with minReplicas 0", {"autoscaling": {"enabled": True, "kind": "hpa", "minReplicas": 0}}, "minReplicas must be at least 1 with kind hpa"),
    ("ServiceMonitor without Service", {"metrics": {"service": {"enabled": False}, "serviceMonitor": {"enabled": True}}}, "needs metrics.service.enabled"),
    ("nightly without a catalog", {"nightly": {"enabled": True, "snapshots": "s3://b/snaps/"}}, "nightly.catalog"),
    ("nightly without snapshots", {"nightly": {"enabled": True, "catalog": "s3://b/c.parquet"}}, "nightly.snapshots"),
    ("nightly catalog not on S3", {"nightly": {"catalog": "/data/c.parquet"}}, "/nightly/catalog"),
    ("nightly deadline not above the wait", {"nightly": {"enabled": True, "catalog": "s3://b/c.parquet", "snapshots": "s3://b/s/", "waitSeconds": 3600, "activeDeadlineSeconds": 3600}}, "must be above nightly.waitSeconds (3600)"),
    ("nightly unknown key", {"nightly": {"scedule": "@daily"}}, "additional properties 'scedule' not allowed"),
    ("review thresholds without a label set", {"pipeline": {"model": {"review_min_score": 0.8}, "sink": {"kafka": {"review_topic": "r"}}}}, "give a label set"),
    ("review thresholds without a review topic", {"model": {"labels": "classes = [\"a\"]\n"}, "pipeline": {"model": {"review_min_score": 0.8}}}, "set pipeline.sink.kafka.review_topic"),
    ("review topic without thresholds", {"pipeline": {"sink": {"kafka": {"review_topic": "r"}}}}, "nothing is routed to it"),
    ("review score above 1", {"pipeline": {"model": {"review_min_score": 1.5}}}, "/pipeline/model/review_min_score"),
    ("librdkafka option with a nested value", {"pipeline": {"source": {"options": {"fetch.max.bytes": {"x": 1}}}}}, "/pipeline/source/options/fetch.max.bytes"),
]


def check_rejections(chart, c: Checks) -> None:
    print(f"\n== values that must be rejected ({len(BAD_VALUES)})")
    for what, values, expect in BAD_VALUES:
        try:
            render(chart, values)
        except helm.HelmError as e:
            msg = " ".join(str(e).split())
            if c.ok(expect in msg, f"rejected: {what}", f"message lacks {expect!r}: {msg}"):
                # the line that names the problem
                shown = next((line.strip() for line in str(e).splitlines() if expect.split("'")[0][:20] in line), msg)
                print(f"    ok   {what}: {shown[:200]}")
            continue
        c.ok(False, f"rejected: {what}", "rendered without an error")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--chart", default=str(CHART))
    ap.add_argument("--clipstream-bin", default=os.environ.get("CLIPSTREAM_BIN") or None)
    ap.add_argument("--validate-mode", choices=("auto", "require", "skip"), default=os.environ.get("CLIPSTREAM_VALIDATE") or "auto")
    ap.add_argument("--kube-versions", default="1.29,1.31", help="comma-separated Kubernetes versions (default 1.29,1.31)")
    a = ap.parse_args()
    t0 = time.monotonic()
    chart_dir = Path(a.chart)
    kube_versions = [v.strip() for v in a.kube_versions.split(",") if v.strip()]
    binary = a.clipstream_bin
    if binary and not (Path(binary).is_file() and os.access(binary, os.X_OK)):
        print(f"check_chart.py: --clipstream-bin {binary} is not an executable file", file=sys.stderr)
        return 2
    c = Checks()
    print(f"helm-python-sdk {helm.__version__} (Helm {helm.helm_sdk_version()}), kubernetes-validate "
          f"{kubernetes_validate.version.__version__}; Kubernetes {', '.join(kube_versions)}; "
          f"clipstream validate: {binary or 'no binary'} ({a.validate_mode})")

    print("\n== helm lint --strict")
    report = helm.lint(str(chart_dir), strict=True, namespace=NAMESPACE)
    for m in report.get("messages", []):
        sev = {1: "INFO", 2: "WARNING", 3: "ERROR"}.get(m.get("severity"), "?")
        print(f"    {sev} {m.get('path')}: {m.get('error')}")
        if m.get("severity", 0) >= 2:
            c.ok(False, f"lint: {m.get('path')}", m.get("error", ""))
    for e in report.get("errors", []):
        c.ok(False, "lint", str(e))
    if not report.get("errors") and not any(m.get("severity", 0) >= 2 for m in report.get("messages", [])):
        print("    ok")

    with helm.Chart.load(str(chart_dir)) as chart:
        defaults = chart.values
        scenarios = [("default", None)] + [(p.name.removesuffix("-values.yaml"), p) for p in sorted((chart_dir / "ci").glob("*-values.yaml"))]
        present = {name for name, _ in scenarios}
        for name in REQUIRED_SCENARIOS:
            c.ok(name in present, f"scenario ci/{name}-values.yaml exists")
        for name, path in scenarios:
            check_scenario(chart, name, load_values(path), defaults, kube_versions, binary, a.validate_mode, c)
        # An explicit grace period just above the deadline is accepted.
        try:
            out = render(chart, {"terminationGracePeriodSeconds": 21})
            c.ok("terminationGracePeriodSeconds: 21" in out[f"{chart.name}/templates/deployment.yaml"], "explicit terminationGracePeriodSeconds 21 (> 20) is used")
        except helm.HelmError as e:
            c.ok(False, "explicit terminationGracePeriodSeconds 21 accepted", str(e))
        check_rejections(chart, c)

    print(f"\n{c.count} checks, {len(c.failures)} failed ({time.monotonic() - t0:.1f} s)")
    print(f"clipstream validate: {VALIDATE['ran']} ran, {VALIDATE['skipped']} skipped" + (f" ({VALIDATE['why']})" if VALIDATE["skipped"] else ""))
    if c.failures:
        print("FAILED:\n  - " + "\n  - ".join(c.failures))
        return 1
    print("chart checks: ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())
