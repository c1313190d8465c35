"""The Helm chart helm/onebase, checked offline with real tools.

- Helm itself (helm-python-sdk: Helm v4's Go library, libhelm, through ctypes) renders the chart,
  lints it and applies values.schema.json, exactly as `helm install/template/lint` would.
- kubernetes-validate checks every built-in kind (strict: unknown fields are errors) against the
  Kubernetes KUBE_VERSION OpenAPI schemas it ships.
- The KubeRay CRDs' openAPIV3Schema (vendored in tests/data/kuberay-crds) checks the RayCluster, RayJob and
  RayService with jsonschema, made strict like `kubectl apply` (unknown fields are errors) and with
  the API server's list-map rule (no two env vars / ports / volumes with the same key). Their pod
  templates are also checked against Kubernetes' own PodTemplateSpec, and their metadata against
  ObjectMeta. A few KubeRay operator rules the CRD cannot express are checked by hand (names,
  replicas, clusterSelector), as are the cross-references between documents (Secrets, ConfigMaps,
  claims, Service selectors).
- The RayService's serveConfigV2 is parsed by Ray Serve's own ServeDeploySchema, the MLflow
  backend URI by SQLAlchemy, and the MLflow Host-header allow-list by MLflow's own matcher.
"""

from __future__ import annotations

import base64
import json
import re
import shlex
from functools import cache
from pathlib import Path
from urllib.parse import urlsplit

import helm_python as helm
import jsonschema
import kubernetes_validate
import pytest
import yaml
from referencing import Registry, Resource

REPO = Path(__file__).resolve().parents[1]
CHART = REPO / "helm" / "onebase"
CRD_DIR = REPO / "tests" / "data" / "kuberay-crds"
KUBE_VERSION = "1.33.0"
RELEASE, NAMESPACE = "onebase", "ml"
RAY_KINDS = {"RayCluster": "rayclusters", "RayJob": "rayjobs", "RayService": "rayservices"}
YAML_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)

SPEC_LORA = {
    "name": "tweet-lora",
    "task": "sequence-classification",
    "model": {"name": "minilm"},
    "data": {"source": "bundled:tweet-sentiment", "max_samples": 2000},
    "method": {"name": "lora", "r": 8, "alpha": 16, "target_modules": ["query", "value"]},
    "scaling": {"num_workers": 2, "resources_per_worker": {"CPU": 2}},
    "output": {"path": "/mnt/onebase/runs"},
}
SPEC_SWEEP = """\
name: sweep-small
job: tweet-lora.yaml
metric: macro_f1
mode: max
methods:
  lora: {r: [8, 16]}
  ia3: {}
"""
# External MLflow database and S3 store, no GPU group, two jobs, serving credentials from an
# existing Secret, GPU serving, a shared volume.
VARIANT = {
    "env": {"HF_HUB_OFFLINE": "1", "ONEBASE_FAIL_AT_STEP": 7},
    "rayCluster": {
        "gpuWorkers": {"enabled": False},
        "cpuWorkers": {"replicas": 1, "minReplicas": 1, "maxReplicas": 3},
    },
    "sharedStorage": {"enabled": True, "storageClassName": "nfs-rwx", "size": "20Gi"},
    "specs": {"tweet-lora": SPEC_LORA, "sweep-small": SPEC_SWEEP},
    "jobs": [
        {"name": "lora-1", "spec": "tweet-lora", "args": ["--set", "train.max_steps=50"]},
        {"name": "sweep-1", "spec": "sweep-small", "type": "sweep", "activeDeadlineSeconds": 7200},
    ],
    "serve": {
        "bases": [{"name": "minilm", "task": "sequence-classification", "gpus": 1, "replicas": 2}],
        "adapters": [{"id": "tweet-sentiment", "source": "models:/tweet-sentiment/1"}],
        "limits": {"max_inputs": 16},
        "auth": {"existingSecret": "serve-creds", "apiKeysKey": "keys", "adminTokenKey": "admin"},
        "workers": {"gpu": True, "gpusPerWorker": 2},
    },
    "mlflow": {
        "backendStore": {"mode": "external", "external": {
            "host": "pg.db.example.com", "port": 6432, "database": "tracking", "username": "mlflow_rw",
            "existingSecret": "mlflow-db", "passwordKey": "pw", "sslMode": "verify-full"}},
        "artifactStore": {"mode": "external", "bucket": "ml-artifacts", "prefix": "onebase", "external": {
            "endpointUrl": "https://s3.example.com", "region": "eu-west-1", "existingSecret": "mlflow-s3",
            "accessKeyIdKey": "id", "secretAccessKeyKey": "secret"}},
    },
}
VARIANT_EXTERNAL_SECRETS = {"serve-creds", "mlflow-db", "mlflow-s3"}


# ---------------------------------------------------------------------------------------------
# Rendering
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def chart():
    with helm.Chart.load(CHART) as loaded:
        yield loaded


def render(chart, values=None, name=RELEASE) -> list[dict]:
    manifests = chart.render(values, name=name, namespace=NAMESPACE)
    docs = []
    for path, text in sorted(manifests.items()):
        if path.endswith("NOTES.txt"):
            continue
        for doc in yaml.safe_load_all(text):
            if doc is not None:
                doc["__source"] = path
                docs.append(doc)
    assert docs, "the chart rendered nothing"
    return docs


@pytest.fixture(scope="module")
def default_docs(chart):
    return render(chart)


@pytest.fixture(scope="module")
def variant_docs(chart):
    return render(chart, VARIANT)


def kinds(docs, kind) -> list[dict]:
    return [d for d in docs if d["kind"] == kind]


def one(docs, kind, component=None) -> dict:
    found = [d for d in kinds(docs, kind)
             if component is None or d["metadata"]["labels"].get("app.kubernetes.io/component") == component]
    assert len(found) == 1, f"expected one {kind} {component or ''}, found {[d['metadata']['name'] for d in found]}"
    return found[0]


def strip(doc) -> dict:
    return {k: v for k, v in doc.items() if k != "__source"}


def ray_cluster_specs(doc) -> list[dict]:
    if doc["kind"] == "RayCluster":
        return [doc["spec"]]
    if doc["kind"] == "RayService":
        return [doc["spec"]["rayClusterConfig"]]
    if doc["kind"] == "RayJob" and "rayClusterSpec" in doc["spec"]:
        return [doc["spec"]["rayClusterSpec"]]
    return []


def pod_templates(doc) -> list[dict]:
    """Every pod template in a document, built-in workload or KubeRay resource."""
    if doc["kind"] in ("Deployment", "StatefulSet", "Job"):
        return [doc["spec"]["template"]]
    templates = []
    for spec in ray_cluster_specs(doc):
        templates.append(spec["headGroupSpec"]["template"])
        templates += [g["template"] for g in spec.get("workerGroupSpecs", [])]
    if doc["kind"] == "RayJob" and "submitterPodTemplate" in doc["spec"]:
        templates.append(doc["spec"]["submitterPodTemplate"])
    return templates


def containers(doc) -> list[dict]:
    return [c for t in pod_templates(doc) for c in t["spec"].get("initContainers", []) + t["spec"]["containers"]]


def env_of(container) -> dict[str, dict]:
    return {e["name"]: e for e in container.get("env", [])}


def decode_secret(doc, key) -> str:
    return base64.b64decode(doc["data"][key]).decode()


# ---------------------------------------------------------------------------------------------
# Validators
# ---------------------------------------------------------------------------------------------

def list_map_keys(validator, keys, instance, schema):
    """The API server's rule for `x-kubernetes-list-type: map`: each item's key tuple is unique."""
    if not validator.is_type(instance, "array"):
        return
    props = schema.get("items", {}).get("properties", {})
    seen = {}
    for i, item in enumerate(instance):
        if not isinstance(item, dict):
            continue
        key = tuple(item.get(k, props.get(k, {}).get("default")) for k in keys)
        if key in seen:
            yield jsonschema.ValidationError(
                f"items {seen[key]} and {i} repeat the key {dict(zip(keys, key))} (list-map keyed by {keys})")
        seen[key] = i


def kube_validator(base):
    return jsonschema.validators.extend(base, {"x-kubernetes-list-map-keys": list_map_keys})


def to_jsonschema(node):
    """A CRD's structural OpenAPI v3 schema as JSON Schema, strict like `kubectl apply`."""
    if isinstance(node, list):
        return [to_jsonschema(n) for n in node]
    if not isinstance(node, dict):
        return node
    out = {k: to_jsonschema(v) for k, v in node.items()}
    for key in ("properties", "patternProperties"):  # property *names* are not schemas
        if key in node:
            out[key] = {name: to_jsonschema(sub) for name, sub in node[key].items()}
    if node.get("nullable") and "type" in out:
        out["type"] = [out["type"], "null"]
    if node.get("x-kubernetes-int-or-string") and "type" not in out and "anyOf" not in out:
        out["type"] = ["integer", "string"]
    if node.get("x-kubernetes-list-type") == "set":
        out["uniqueItems"] = True
    if ("properties" in node and "additionalProperties" not in node
            and not node.get("x-kubernetes-preserve-unknown-fields")):
        out["additionalProperties"] = False  # unknown fields: an error, not silently pruned
    return out


@pytest.fixture(scope="module")
def crd_validators():
    if not CRD_DIR.is_dir():
        pytest.fail(f"KubeRay CRDs not found at {CRD_DIR} (expected ray.io_rayclusters.yaml, ray.io_rayjobs.yaml, "
                    "ray.io_rayservices.yaml there; see the README in that folder)")
    validators = {}
    for kind, plural in RAY_KINDS.items():
        path = CRD_DIR / f"ray.io_{plural}.yaml"
        assert path.is_file(), f"missing CRD {path}"
        crd = yaml.load(path.read_text(), Loader=YAML_LOADER)
        assert crd["spec"]["names"]["kind"] == kind
        version = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")
        schema = to_jsonschema(version["schema"]["openAPIV3Schema"])
        validators[kind] = kube_validator(jsonschema.Draft7Validator)(schema)
    return validators


@cache
def k8s_definition_validator(definition: str):
    """Kubernetes' own schema for one definition (e.g. PodTemplateSpec), from kubernetes-validate."""
    root = Path(kubernetes_validate.__file__).parent / "kubernetes-json-schema" / f"v{KUBE_VERSION}-local-strict"
    defs = json.loads((root / "_definitions.json").read_text())
    registry = Resource.from_contents(defs) @ Registry()
    schema = {"$ref": f"{defs['$id']}#/$defs/{definition}"}
    return kube_validator(jsonschema.Draft202012Validator)(schema, registry=registry)


def errors_of(validator, instance) -> list[str]:
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(instance)]


DNS1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")


def kuberay_operator_errors(docs) -> list[str]:
    """Rules of KubeRay's ray-operator/controllers/ray/utils/validation.go the CRD schema cannot carry."""
    errs = []
    clusters = {d["metadata"]["name"] for d in kinds(docs, "RayCluster")}
    limits = {"RayCluster": 53, "RayService": 47, "RayJob": 47}  # MaxRay*NameLength
    for doc in docs:
        kind, name = doc["kind"], doc["metadata"]["name"]
        if kind not in limits:
            continue
        if len(name) > limits[kind] or not DNS1035.match(name):
            errs.append(f"{kind} {name}: must be a DNS-1035 label of at most {limits[kind]} characters")
        for spec in ray_cluster_specs(doc):
            autoscaling = spec.get("enableInTreeAutoscaling", False)
            for group in spec.get("workerGroupSpecs", []):
                lo, hi = group.get("minReplicas"), group.get("maxReplicas")
                if not autoscaling and (lo is None or hi is None):
                    errs.append(f"{name}/{group['groupName']}: min/maxReplicas required without autoscaling")
                if lo is not None and hi is not None and lo > hi:
                    errs.append(f"{name}/{group['groupName']}: minReplicas {lo} > maxReplicas {hi}")
            head = spec["headGroupSpec"]["template"]["spec"]["containers"][0]
            if spec.get("rayVersion") is None:
                errs.append(f"{name}: rayVersion unset")
            if "RAY_REDIS_ADDRESS" in env_of(head):
                errs.append(f"{name}: RAY_REDIS_ADDRESS without GcsFaultToleranceOptions")
        if kind == "RayJob":
            selector = doc["spec"].get("clusterSelector") or {}
            if not selector and "rayClusterSpec" not in doc["spec"]:
                errs.append(f"RayJob {name}: neither clusterSelector nor rayClusterSpec")
            if selector:
                if selector.get("ray.io/cluster") not in clusters:
                    errs.append(f"RayJob {name}: clusterSelector {selector} names no rendered RayCluster")
                if doc["spec"].get("submissionMode") == "SidecarMode":
                    errs.append(f"RayJob {name}: clusterSelector is not supported in SidecarMode")
                if (doc["spec"].get("backoffLimit") or 0) > 0:
                    errs.append(f"RayJob {name}: backoffLimit is incompatible with clusterSelector")
    return errs


def reference_errors(docs, external_secrets=frozenset(), external_claims=frozenset()) -> list[str]:
    """Secrets, ConfigMaps and claims a pod uses exist (rendered or named external), and every
    Service selects some rendered pod template with a matching named port."""
    errs = []
    secrets = {d["metadata"]["name"]: d for d in kinds(docs, "Secret")}
    configmaps = {d["metadata"]["name"]: d for d in kinds(docs, "ConfigMap")}
    claims = {d["metadata"]["name"] for d in kinds(docs, "PersistentVolumeClaim")} | set(external_claims)
    for doc in docs:
        where = f"{doc['kind']} {doc['metadata']['name']}"
        for template in pod_templates(doc):
            for c in template["spec"].get("initContainers", []) + template["spec"]["containers"]:
                for e in c.get("env", []):
                    ref = e.get("valueFrom", {}).get("secretKeyRef")
                    if not ref:
                        continue
                    if ref["name"] in secrets:
                        if ref["key"] not in secrets[ref["name"]].get("data", {}):
                            errs.append(f"{where}: env {e['name']}: Secret {ref['name']} has no key {ref['key']}")
                    elif ref["name"] not in external_secrets:
                        errs.append(f"{where}: env {e['name']}: Secret {ref['name']} is neither rendered nor expected")
                mounts = {m["name"] for m in c.get("volumeMounts", [])}
                volumes = {v["name"] for v in template["spec"].get("volumes", [])}
                volumes |= {v["metadata"]["name"] for v in doc.get("spec", {}).get("volumeClaimTemplates", [])}
                if mounts - volumes:
                    errs.append(f"{where}: container {c['name']} mounts undefined volumes {mounts - volumes}")
            for v in template["spec"].get("volumes", []):
                if "configMap" in v and v["configMap"]["name"] not in configmaps:
                    errs.append(f"{where}: volume {v['name']}: ConfigMap {v['configMap']['name']} not rendered")
                if "persistentVolumeClaim" in v and v["persistentVolumeClaim"]["claimName"] not in claims:
                    errs.append(f"{where}: volume {v['name']}: claim {v['persistentVolumeClaim']['claimName']} missing")
    workloads = [d for d in docs if d["kind"] in ("Deployment", "StatefulSet")]
    for svc in kinds(docs, "Service"):
        selector = svc["spec"]["selector"]
        targets = [w for w in workloads
                   if selector.items() <= w["spec"]["template"]["metadata"]["labels"].items()]
        if len(targets) != 1:
            errs.append(f"Service {svc['metadata']['name']} selects {len(targets)} workloads")
            continue
        pod = targets[0]["spec"]["template"]["spec"]
        ports = {p.get("name") for c in pod["containers"] for p in c.get("ports", [])}
        for port in svc["spec"]["ports"]:
            if isinstance(port["targetPort"], str) and port["targetPort"] not in ports:
                errs.append(f"Service {svc['metadata']['name']}: targetPort {port['targetPort']} not a container port")
    for w in workloads:
        labels = w["spec"]["template"]["metadata"]["labels"]
        if not w["spec"]["selector"]["matchLabels"].items() <= labels.items():
            errs.append(f"{w['kind']} {w['metadata']['name']}: selector does not match its pod labels")
    return errs


def validate_all(docs, crd_validators, **externals):
    problems = []
    for doc in docs:
        body, where = strip(doc), f"{doc['__source']}: {doc['kind']} {doc['metadata']['name']}"
        if doc["kind"] in RAY_KINDS:
            assert doc["apiVersion"] == "ray.io/v1", where
            problems += [f"{where}: CRD: {e}" for e in errors_of(crd_validators[doc["kind"]], body)]
            problems += [f"{where}: metadata: {e}" for e in errors_of(
                k8s_definition_validator("io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta"), body["metadata"])]
        else:
            try:
                kubernetes_validate.validate(body, KUBE_VERSION, strict=True)
            except kubernetes_validate.ValidationError as err:
                problems.append(f"{where}: kubernetes {KUBE_VERSION}: {'/'.join(map(str, err.path))}: {err.message}")
        for i, template in enumerate(pod_templates(doc)):
            problems += [f"{where}: pod template {i}: {e}" for e in errors_of(
                k8s_definition_validator("io.k8s.api.core.v1.PodTemplateSpec"), template)]
    problems += kuberay_operator_errors(docs)
    problems += reference_errors(docs, **externals)
    assert not problems, "invalid rendered manifests:\n" + "\n".join(problems)


# ---------------------------------------------------------------------------------------------
# The chart renders, lints and validates
# ---------------------------------------------------------------------------------------------

def test_chart_metadata(chart):
    meta = chart.metadata
    assert meta["apiVersion"] == "v2" and meta["name"] == "onebase"
    jsonschema.Draft7Validator.check_schema(chart.schema)
    assert chart.schema["$schema"] == "http://json-schema.org/draft-07/schema#"
    assert chart.schema["additionalProperties"] is False


@pytest.mark.parametrize("values", [None, VARIANT], ids=["default", "variant"])
def test_lint_clean(values):
    report = helm.lint(CHART, values, strict=True, namespace=NAMESPACE, kube_version=f"v{KUBE_VERSION}")
    serious = [m for m in report["messages"] if m["severity"] >= 2]
    assert not serious and not report["errors"], report


def test_default_render_is_valid(default_docs, crd_validators):
    assert {d["kind"] for d in default_docs} >= {"RayCluster", "RayService", "Deployment", "StatefulSet", "Service",
                                                  "Secret", "PersistentVolumeClaim", "ConfigMap", "Job"}
    assert not kinds(default_docs, "RayJob")
    validate_all(default_docs, crd_validators)


def test_variant_render_is_valid(variant_docs, crd_validators):
    assert len(kinds(variant_docs, "RayJob")) == 2
    validate_all(variant_docs, crd_validators, external_secrets=VARIANT_EXTERNAL_SECRETS)


def test_long_release_name_keeps_kuberay_names_valid(chart, crd_validators):
    docs = render(chart, {"specs": {"s": SPEC_LORA}, "jobs": [{"name": "a-rather-long-job-name", "spec": "s"}]},
                  name="a-very-long-release-name-for-a-team-cluster-0123456")
    validate_all(docs, crd_validators)
    for doc in docs:
        assert len(doc["metadata"]["name"]) <= 63, doc["metadata"]["name"]


def test_validators_catch_broken_manifests(default_docs, crd_validators):
    """The checks above can fail: feed them manifests with the mistakes they exist to catch."""
    cluster = strip(json.loads(json.dumps(one(default_docs, "RayCluster"))))
    cluster["spec"]["headGroupSpec"]["rayStartParam"] = {}  # typo: an unknown field
    cluster["spec"]["workerGroupSpecs"][0]["minReplicas"] = "2"  # wrong type
    head = cluster["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    head["env"].append({"name": "MLFLOW_TRACKING_URI", "value": "http://elsewhere"})  # duplicate env
    errors = "\n".join(errors_of(crd_validators["RayCluster"], cluster))
    assert "rayStartParam" in errors and "'2' is not of type 'integer'" in errors
    assert "repeat the key {'name': 'MLFLOW_TRACKING_URI'}" in errors

    deployment = strip(json.loads(json.dumps(one(default_docs, "Deployment", "mlflow"))))
    mlflow = deployment["spec"]["template"]["spec"]["containers"][0]
    mlflow["ports"][0]["containerPort"] = "5000"  # a string where Kubernetes wants an integer
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBE_VERSION, strict=True)
    mlflow["ports"][0]["containerPort"] = 5000
    mlflow["envFrom"] = [{"secretRef": {"name": "x"}}]
    kubernetes_validate.validate(deployment, KUBE_VERSION, strict=True)  # a real field passes
    deployment["spec"]["replica"] = 1
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBE_VERSION, strict=True)

    broken = json.loads(json.dumps([strip(d) for d in default_docs]))
    for d in broken:
        if d["kind"] == "Secret" and d["metadata"]["name"].endswith("serve-auth"):
            d["metadata"]["name"] = "renamed"
    assert any("serve-auth is neither rendered" in e for e in reference_errors(broken))


# ---------------------------------------------------------------------------------------------
# Values the schema refuses: Helm itself refuses the values file
# ---------------------------------------------------------------------------------------------

BAD_VALUES = {
    "unknown top-level key": ("replicaCount: 3\n", "additional properties 'replicaCount'"),
    "unknown nested key": ("rayCluster:\n  cpuWorker:\n    replicas: 2\n", "cpuWorker"),
    "negative replicas": ("rayCluster:\n  cpuWorkers:\n    replicas: -1\n", "/rayCluster/cpuWorkers/replicas"),
    "negative maxReplicas": ("serve:\n  workers:\n    maxReplicas: -3\n", "/serve/workers/maxReplicas"),
    "string for a count": ("rayCluster:\n  gpuWorkers:\n    maxReplicas: four\n", "/rayCluster/gpuWorkers/maxReplicas"),
    "string for a boolean": ("serve:\n  auth:\n    enabled: \"yes\"\n", "/serve/auth/enabled"),
    "zero GPUs per GPU worker": ("rayCluster:\n  gpuWorkers:\n    gpusPerWorker: 0\n", "gpusPerWorker"),
    "bad quantity": ("rayCluster:\n  head:\n    resources:\n      limits:\n        memory: 8GB\n", "memory"),
    "number for rayStartParams": ("rayCluster:\n  head:\n    rayStartParams:\n      num-cpus: 0\n", "num-cpus"),
    "unknown backend mode": ("mlflow:\n  backendStore:\n    mode: sqlite\n", "/mlflow/backendStore/mode"),
    "external db without host": ("mlflow:\n  backendStore:\n    mode: external\n    external:\n"
                                 "      existingSecret: db\n", "host"),
    "external s3 without secret": ("mlflow:\n  artifactStore:\n    mode: external\n", "external"),
    "no MLflow at all": ("mlflow:\n  enabled: false\n", "trackingUri"),
    "overriding a chart-owned env var": ("env:\n  MLFLOW_TRACKING_URI: http://x\n", "MLFLOW_TRACKING_URI"),
    "bad job name": ("specs:\n  s: {name: s}\njobs:\n  - name: Job_1\n    spec: s\n", "/jobs/0/name"),
    "bad job type": ("specs:\n  s: {name: s}\njobs:\n  - name: j\n    spec: s\n    type: train\n", "/jobs/0/type"),
    "unknown task": ("serve:\n  bases:\n    - {name: minilm, task: summarization}\n", "/serve/bases/0/task"),
    "adapter id over 64 characters": ("serve:\n  adapters:\n    - {id: " + "a" * 65 + ", source: s}\n",
                                      "/serve/adapters/0/id"),
    "negative serve GPUs": ("serve:\n  bases:\n    - {name: minilm, gpus: -1}\n", "/serve/bases/0/gpus"),
    "adapter without source": ("serve:\n  adapters:\n    - {id: a}\n", "source"),
    "comma in an API key": ("serve:\n  auth:\n    apiKeys: [\"a,b\"]\n", "/serve/auth/apiKeys/0"),
}


@pytest.mark.parametrize("case", sorted(BAD_VALUES))
def test_helm_refuses_bad_values_file(chart, tmp_path, case):
    text, where = BAD_VALUES[case]
    values_file = tmp_path / "bad-values.yaml"
    values_file.write_text(text)
    values = helm.values_from_yaml(values_file.read_text())  # Helm's own -f parser
    with pytest.raises(helm.HelmValuesError) as refused:
        chart.render(values, name=RELEASE, namespace=NAMESPACE)
    assert "schema" in str(refused.value) and where in str(refused.value), str(refused.value)
    report = helm.lint(CHART, values, namespace=NAMESPACE)
    assert any(where in e for e in report["errors"]), report


@pytest.mark.parametrize("values, message", [
    ({"rayCluster": {"cpuWorkers": {"minReplicas": 5, "maxReplicas": 2, "replicas": 2}}},
     "minReplicas (5) is greater than maxReplicas (2)"),
    ({"jobs": [{"name": "j", "spec": "missing"}]}, 'spec "missing" is not a key of .Values.specs'),
    ({"specs": {"s": SPEC_LORA}, "jobs": [{"name": "j", "spec": "s"}, {"name": "j", "spec": "s"}]},
     'the name "j" is used twice'),
    ({"rayCluster": {"enabled": False}, "specs": {"s": SPEC_LORA}, "jobs": [{"name": "j", "spec": "s"}]},
     "set rayCluster.enabled to true"),
    ({"rayCluster": {"cpuWorkers": {"enabled": False}, "gpuWorkers": {"enabled": False}}},
     "enable at least one of cpuWorkers and gpuWorkers"),
])
def test_template_refuses_inconsistent_values(chart, values, message):
    with pytest.raises(helm.HelmError) as refused:
        chart.render(values, name=RELEASE, namespace=NAMESPACE)
    assert message in str(refused.value)


# ---------------------------------------------------------------------------------------------
# What users rely on
# ---------------------------------------------------------------------------------------------

def tracking_uri(docs) -> str:
    return env_of(containers(one(docs, "RayCluster"))[0])["MLFLOW_TRACKING_URI"]["value"]


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # importing mlflow.server
@pytest.mark.parametrize("which", ["default", "variant"])
def test_ray_containers_track_to_the_chart_mlflow(request, which):
    docs = request.getfixturevalue(f"{which}_docs")
    uri = tracking_uri(docs)
    mlflow_svc = one(docs, "Service", "mlflow")
    parts = urlsplit(uri)
    assert parts.scheme == "http" and parts.port == mlflow_svc["spec"]["ports"][0]["port"]
    assert parts.hostname.split(".")[:2] == [mlflow_svc["metadata"]["name"], NAMESPACE]
    ray_docs = [d for d in docs if d["kind"] in RAY_KINDS]
    for c in (c for d in ray_docs for c in containers(d)):
        env = env_of(c)
        assert env["MLFLOW_TRACKING_URI"]["value"] == uri, c["name"]
        assert env["ONEBASE_CACHE"]["value"].startswith("/")
    # MLflow rejects Host headers outside --allowed-hosts: the in-cluster URI must pass its own matcher.
    from mlflow.server.security_utils import is_allowed_host_header

    args = containers(one(docs, "Deployment", "mlflow"))[-1]["args"]
    allowed = args[args.index("--allowed-hosts") + 1].split(",")
    assert is_allowed_host_header(allowed, parts.netloc)
    assert is_allowed_host_header(allowed, f"{mlflow_svc['metadata']['name']}:{parts.port}")
    assert not is_allowed_host_header(allowed, "evil.example.com")


def test_external_tracking_server(chart, crd_validators):
    docs = render(chart, {"mlflow": {"enabled": False, "trackingUri": "https://mlflow.example.com"}})
    assert not [d for d in docs if d["metadata"]["labels"].get("app.kubernetes.io/component")
                in ("mlflow", "postgresql", "minio")]
    assert tracking_uri(docs) == "https://mlflow.example.com"
    serve_config = yaml.safe_load(one(docs, "RayService")["spec"]["serveConfigV2"])
    assert serve_config["applications"][0]["args"]["tracking_uri"] == "https://mlflow.example.com"
    validate_all(docs, crd_validators)


def test_autoscaling_worker_groups(chart, default_docs, variant_docs):
    spec = one(default_docs, "RayCluster")["spec"]
    assert spec["enableInTreeAutoscaling"] is True and spec["autoscalerOptions"]["idleTimeoutSeconds"] == 120
    groups = {g["groupName"]: g for g in spec["workerGroupSpecs"]}
    assert set(groups) == {"cpu", "gpu"}
    assert (groups["cpu"]["minReplicas"], groups["cpu"]["maxReplicas"]) == (2, 8)
    assert (groups["gpu"]["minReplicas"], groups["gpu"]["maxReplicas"]) == (0, 4)
    gpu = groups["gpu"]["template"]["spec"]
    assert gpu["containers"][0]["image"].endswith("-cuda")
    assert gpu["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert any(t["key"] == "nvidia.com/gpu" for t in gpu["tolerations"])
    cpu = groups["cpu"]["template"]["spec"]["containers"][0]
    assert cpu["image"].endswith("-cpu") and "nvidia.com/gpu" not in cpu["resources"]["limits"]

    variant = one(variant_docs, "RayCluster")["spec"]["workerGroupSpecs"]
    assert [(g["groupName"], g["minReplicas"], g["maxReplicas"]) for g in variant] == [("cpu", 1, 3)]
    env = env_of(variant[0]["template"]["spec"]["containers"][0])
    assert env["HF_HUB_OFFLINE"]["value"] == "1" and env["ONEBASE_FAIL_AT_STEP"]["value"] == "7"
    mounts = {m["mountPath"] for m in variant[0]["template"]["spec"]["containers"][0]["volumeMounts"]}
    assert {"/specs", "/mnt/onebase", "/dev/shm"} <= mounts
    assert one(variant_docs, "PersistentVolumeClaim")["spec"]["accessModes"] == ["ReadWriteMany"]

    fixed = one(render(chart, {"rayCluster": {"autoscaling": {"enabled": False}}}), "RayCluster")["spec"]
    assert fixed["enableInTreeAutoscaling"] is False and "autoscalerOptions" not in fixed


def test_serve_values_schema_is_the_serve_apps_own(chart):
    """The serve app's bases, adapters and limits reach ServeArgs unchanged: the chart's schema for
    them is generated from ServeArgs (onebase.serve.helm_schema), so the two cannot drift apart."""
    from pydantic import ValidationError

    from onebase.serve.config import ServeArgs
    from onebase.serve.helm_schema import GENERATED, serve_values_schema

    served = chart.schema["properties"]["serve"]["properties"]
    assert {name: served[name] for name in GENERATED} == serve_values_schema(), \
        "helm/onebase/values.schema.json is stale: run python -m onebase.serve.helm_schema"
    # Both refuse what the app refuses: a 65-character adapter id, a mistyped base task.
    for bad, where in (({"adapters": [{"id": "a" * 65, "source": "x"}]}, "/serve/adapters/0/id"),
                       ({"bases": [{"name": "minilm", "task": "casual-lm"}]}, "/serve/bases/0/task")):
        with pytest.raises(helm.HelmValuesError, match=where):
            render(chart, {"serve": bad})
        with pytest.raises(ValidationError):
            ServeArgs.model_validate({"bases": [{"name": "minilm"}], **bad})


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # Ray Serve's pydantic models, on import
def test_serve_config(default_docs, variant_docs):
    from ray.serve.schema import ServeDeploySchema

    default_bases = [{"name": "minilm", "task": "sequence-classification"}]
    for docs, values in ((default_docs, {"bases": default_bases, "adapters": []}), (variant_docs, VARIANT["serve"])):
        service = one(docs, "RayService")
        raw = service["spec"]["serveConfigV2"]
        assert isinstance(raw, str)
        config = yaml.safe_load(raw)
        ServeDeploySchema.model_validate(config)  # what Ray Serve does with it on the cluster
        (app,) = config["applications"]
        assert app["import_path"] == "onebase.serve.app:build"
        assert app["route_prefix"] == "/"
        args = app["args"]
        assert args["tracking_uri"] == tracking_uri(docs)
        assert args["bases"] == values["bases"] and args["adapters"] == values["adapters"]
        assert args.get("limits") == values.get("limits")
        assert args["auth"] == {"api_keys_env": "ONEBASE_API_KEYS", "admin_token_env": "ONEBASE_ADMIN_TOKEN"}
        # The env names the app is told to read are the ones the containers get.
        for c in containers(service):
            assert {args["auth"]["api_keys_env"], args["auth"]["admin_token_env"]} <= set(env_of(c))
    workers = one(variant_docs, "RayService")["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]
    container = workers["template"]["spec"]["containers"][0]
    assert container["image"].endswith("-cuda") and container["resources"]["limits"]["nvidia.com/gpu"] == 2


def test_serving_secrets_reach_every_ray_container(chart, default_docs, variant_docs):
    # Default: the chart creates the Secret, with generated credentials.
    secret = one(default_docs, "Secret", "serve-auth")
    assert set(secret["data"]) == {"api-keys", "admin-token"}
    assert len(decode_secret(secret, "admin-token")) >= 32 and decode_secret(secret, "api-keys")
    service = one(default_docs, "RayService")
    assert len(containers(service)) == 2  # head + worker group
    for c in containers(service):
        env = env_of(c)
        for var, key in (("ONEBASE_API_KEYS", "api-keys"), ("ONEBASE_ADMIN_TOKEN", "admin-token")):
            assert env[var]["valueFrom"]["secretKeyRef"] == {"name": secret["metadata"]["name"], "key": key}
            assert "value" not in env[var]
    # Training pods and job submitters do not get serving credentials.
    for c in containers(one(default_docs, "RayCluster")):
        assert "ONEBASE_ADMIN_TOKEN" not in env_of(c) and "ONEBASE_API_KEYS" not in env_of(c)

    # Given keys: stored comma-separated.
    given = render(chart, {"serve": {"auth": {"apiKeys": ["k-one", "k-two"], "adminToken": "t0ken"}}})
    secret = one(given, "Secret", "serve-auth")
    assert decode_secret(secret, "api-keys") == "k-one,k-two"
    assert decode_secret(secret, "admin-token") == "t0ken"

    # An existing Secret: none rendered, env points at it with its key names.
    assert not [s for s in kinds(variant_docs, "Secret") if "serve-auth" in s["metadata"]["name"]]
    for c in containers(one(variant_docs, "RayService")):
        env = env_of(c)
        assert env["ONEBASE_API_KEYS"]["valueFrom"]["secretKeyRef"] == {"name": "serve-creds", "key": "keys"}
        assert env["ONEBASE_ADMIN_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": "serve-creds", "key": "admin"}

    # Auth off: no Secret, no env, no auth settings for the app.
    off = render(chart, {"serve": {"auth": {"enabled": False}}})
    assert not [s for s in kinds(off, "Secret") if "serve-auth" in s["metadata"]["name"]]
    service = one(off, "RayService")
    assert all("ONEBASE_API_KEYS" not in env_of(c) for c in containers(service))
    assert "auth" not in yaml.safe_load(service["spec"]["serveConfigV2"])["applications"][0]["args"]


def mlflow_server(docs):
    container = containers(one(docs, "Deployment", "mlflow"))[-1]
    args, env = container["args"], env_of(container)

    def arg(flag):
        return args[args.index(flag) + 1]

    return container, args, env, arg


def expand(text, env) -> str:
    """Kubernetes' $(VAR) expansion of container args, with secret-sourced vars as placeholders."""
    def value(match):
        var = env[match.group(1)]
        if "value" in var:
            return var["value"]
        ref = var["valueFrom"]["secretKeyRef"]
        return f"SECRET-{ref['name']}-{ref['key']}"
    return re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", value, text)


def test_mlflow_bundled_postgres_and_minio(default_docs):
    from sqlalchemy.engine import make_url

    container, args, env, arg = mlflow_server(default_docs)
    assert container["command"][:2] == ["mlflow", "server"]
    assert arg("--host") == "0.0.0.0" and "--serve-artifacts" in args
    pg_svc, pg_secret = one(default_docs, "Service", "postgresql"), one(default_docs, "Secret", "postgresql")
    url = make_url(expand(arg("--backend-store-uri"), env))
    assert url.drivername == "postgresql" and url.host == pg_svc["metadata"]["name"]
    assert url.port == pg_svc["spec"]["ports"][0]["port"] == 5432
    assert (url.database, url.username) == ("mlflow", "mlflow")
    assert url.password == f"SECRET-{pg_secret['metadata']['name']}-password"  # from the Secret, not inline
    assert len(decode_secret(pg_secret, "password")) >= 32
    # Postgres itself reads the same Secret key.
    postgres = containers(one(default_docs, "StatefulSet", "postgresql"))[0]
    assert env_of(postgres)["POSTGRES_PASSWORD"]["valueFrom"]["secretKeyRef"] == {
        "name": pg_secret["metadata"]["name"], "key": "password"}
    assert one(default_docs, "StatefulSet", "postgresql")["spec"]["volumeClaimTemplates"]

    minio_svc, minio_secret = one(default_docs, "Service", "minio"), one(default_docs, "Secret", "minio")
    assert arg("--artifacts-destination") == "s3://mlflow/artifacts"
    assert env["MLFLOW_S3_ENDPOINT_URL"]["value"] == f"http://{minio_svc['metadata']['name']}:9000"
    for var, key in (("AWS_ACCESS_KEY_ID", "root-user"), ("AWS_SECRET_ACCESS_KEY", "root-password")):
        assert env[var]["valueFrom"]["secretKeyRef"] == {"name": minio_secret["metadata"]["name"], "key": key}
    bucket_job = one(default_docs, "Job", "minio-bucket")
    assert "mc mb --ignore-existing \"onebase/mlflow\"" in containers(bucket_job)[0]["command"][-1]
    assert "post-install" in bucket_job["metadata"]["annotations"]["helm.sh/hook"]
    minio = one(default_docs, "Deployment", "minio")["spec"]["template"]["spec"]
    assert minio["volumes"][0]["persistentVolumeClaim"]["claimName"] == one(default_docs, "PersistentVolumeClaim",
                                                                           "minio")["metadata"]["name"]


def test_mlflow_external_database_and_store(variant_docs):
    from sqlalchemy.engine import make_url

    _, args, env, arg = mlflow_server(variant_docs)
    assert not [d for d in variant_docs if d["metadata"]["labels"].get("app.kubernetes.io/component")
                in ("postgresql", "minio", "minio-bucket")]
    url = make_url(expand(arg("--backend-store-uri"), env))
    assert (url.drivername, url.host, url.port, url.database, url.username) == (
        "postgresql", "pg.db.example.com", 6432, "tracking", "mlflow_rw")
    assert url.password == "SECRET-mlflow-db-pw" and url.query == {"sslmode": "verify-full"}
    assert arg("--artifacts-destination") == "s3://ml-artifacts/onebase"
    assert env["MLFLOW_S3_ENDPOINT_URL"]["value"] == "https://s3.example.com"
    assert env["AWS_DEFAULT_REGION"]["value"] == "eu-west-1"
    assert env["AWS_ACCESS_KEY_ID"]["valueFrom"]["secretKeyRef"] == {"name": "mlflow-s3", "key": "id"}
    assert env["AWS_SECRET_ACCESS_KEY"]["valueFrom"]["secretKeyRef"] == {"name": "mlflow-s3", "key": "secret"}
    init = one(variant_docs, "Deployment", "mlflow")["spec"]["template"]["spec"]["initContainers"][0]
    assert "pg_isready -h pg.db.example.com -p 6432" in init["command"][-1]


def test_training_jobs(variant_docs):
    cluster = one(variant_docs, "RayCluster")
    configmap = one(variant_docs, "ConfigMap", "specs")
    assert yaml.safe_load(configmap["data"]["tweet-lora.yaml"]) == SPEC_LORA
    assert configmap["data"]["sweep-small.yaml"].strip() == SPEC_SWEEP.strip()  # strings stay verbatim
    head = cluster["spec"]["headGroupSpec"]["template"]["spec"]
    (mount,) = [m for m in head["containers"][0]["volumeMounts"] if m["mountPath"] == "/specs"]
    (volume,) = [v for v in head["volumes"] if v["name"] == mount["name"]]
    assert volume["configMap"]["name"] == configmap["metadata"]["name"]

    jobs = {j["metadata"]["labels"]["onebase.io/job"]: j for j in kinds(variant_docs, "RayJob")}
    expected = {
        "lora-1": ["onebase", "run", "/specs/tweet-lora.yaml", "--tracking-uri", "$MLFLOW_TRACKING_URI",
                   "--set", "train.max_steps=50"],
        "sweep-1": ["onebase", "sweep", "/specs/sweep-small.yaml", "--tracking-uri", "$MLFLOW_TRACKING_URI"],
    }
    assert set(jobs) == set(expected)
    for name, argv in expected.items():
        job = jobs[name]["spec"]
        assert shlex.split(job["entrypoint"]) == argv
        assert Path(argv[2]).name in configmap["data"]  # the spec file the job names is in /specs
        assert job["clusterSelector"] == {"ray.io/cluster": cluster["metadata"]["name"]}
        assert "rayClusterSpec" not in job
        # KubeRay runs the submit command through bash in the submitter pod: $MLFLOW_TRACKING_URI
        # expands there, so the submitter must carry it.
        submitter = job["submitterPodTemplate"]["spec"]["containers"][0]
        assert env_of(submitter)["MLFLOW_TRACKING_URI"]["value"] == tracking_uri(variant_docs)
        assert "command" not in submitter  # KubeRay fills in `ray job submit ...`
    assert jobs["sweep-1"]["spec"]["activeDeadlineSeconds"] == 7200
