"""Kubernetes through the Dask operator: a CPU worker group and a GPU worker group.

Embedding tasks carry ``resources={"GPU": 1}`` (``ExecutionOptions(num_gpus=1)``),
so they run only on the GPU group, whose workers start with ``--resources
GPU=1`` and hold one ``nvidia.com/gpu`` each; reading and decoding blocks runs
on every worker, so the cheaper CPU group (the cluster's ``default`` group,
the one ``adapt`` scales) adds decoding throughput without holding a GPU.

The resource dicts are built by pure functions (`kubernetes_cluster_spec`,
`gpu_worker_group_spec`) so they can be checked against the operator's CRD
schemas without a cluster; `kubernetes_cluster` only hands them to
``dask_kubernetes.operator.KubeCluster``.  The manifests in ``k8s/`` are the
same objects as YAML, for ``kubectl apply``.
"""

from __future__ import annotations

import math
import re
from typing import Any, Mapping, Sequence

INSTALL = "pip install 'slide2vec-dask[k8s]'"
API_VERSION = "kubernetes.dask.org/v1"
GPU_GROUP = "gpu"
GPU_RESOURCE = "nvidia.com/gpu"
SCHEDULER_PORT, DASHBOARD_PORT, WORKER_DASHBOARD_PORT = 8786, 8787, 8788
DEFAULT_GPU_TOLERATIONS = ({"key": GPU_RESOURCE, "operator": "Exists", "effect": "NoSchedule"},)
# Decode threads per GPU worker when no CPU request says otherwise: enough to keep one GPU fed,
# few enough that the blocks in flight (threads x prefetch_factor) stay small in memory.
DEFAULT_GPU_NTHREADS = 8
LABEL_APP = "app.kubernetes.io/name"

# The operator names the scheduler Service "<name>-scheduler" (63 characters at most).
_NAME = re.compile(r"^(?=.{1,53}$)[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
# Kubernetes resource quantities: "8", "500m", "16Gi", "1.5", "2e3".
_QUANTITY = re.compile(r"^[+]?(\d+(\.\d*)?|\.\d+)([eE][-+]?\d+|Ki|Mi|Gi|Ti|Pi|Ei|[numkMGTPE])?$")


# -- pure spec builders --------------------------------------------------------------------------
def scheduler_address(name: str = "slide2vec", namespace: str | None = None) -> str:
    """Where pods reach the scheduler: ``tcp://<name>-scheduler[.<namespace>.svc.cluster.local]:8786``."""
    host = f"{_checked_name(name)}-scheduler"
    if namespace:
        host += f".{namespace}.svc.cluster.local"
    return f"tcp://{host}:{SCHEDULER_PORT}"


def kubernetes_cluster_spec(name: str = "slide2vec", *, image: str, namespace: str | None = None,
                            n_workers: int = 1, worker_resources: Mapping | None = None,
                            worker_nthreads: int | None = None, scheduler_resources: Mapping | None = None,
                            env: Mapping[str, Any] | Sequence[Mapping] | None = None,
                            volumes: Sequence[Mapping] | None = None,
                            volume_mounts: Sequence[Mapping] | None = None,
                            scheduler_service_type: str = "ClusterIP", idle_timeout: int = 0) -> dict:
    """The ``DaskCluster`` resource: the scheduler and the CPU (``default``) worker group.

    ``env`` (a dict, or Kubernetes ``env`` entries for ``valueFrom`` secrets)
    and ``volumes``/``volume_mounts`` go to the workers only: they build the
    model (``HF_HOME``, ``HF_TOKEN``), read slides and write the store, while the
    scheduler touches no files and needs no secrets.
    ``worker_nthreads`` defaults to the CPU limit (else request) when one is given,
    otherwise to what Dask sees in the container.
    """
    name = _checked_name(name)
    _check_image(image)
    _check_count("n_workers", n_workers)
    if scheduler_service_type not in ("ClusterIP", "NodePort", "LoadBalancer"):
        raise ValueError(f"scheduler_service_type must be ClusterIP, NodePort or LoadBalancer, "
                         f"got {scheduler_service_type!r}")
    _check_count("idle_timeout", idle_timeout)
    env_list = _env(env)
    resources = _resources("worker_resources", worker_resources)
    nthreads = _nthreads("worker_nthreads", worker_nthreads, resources, default=None)
    worker = _worker(image, n_workers, resources, nthreads, env_list, volumes, volume_mounts,
                     extra_args=[], labels={LABEL_APP: "slide2vec-dask", "slide2vec-dask/role": "cpu-worker"})
    scheduler_container = {
        "name": "scheduler", "image": image,
        "args": ["dask", "scheduler", "--host", "0.0.0.0", "--port", str(SCHEDULER_PORT),
                 "--dashboard-address", f":{DASHBOARD_PORT}"],
        "ports": [{"name": "tcp-comm", "containerPort": SCHEDULER_PORT, "protocol": "TCP"},
                  {"name": "http-dashboard", "containerPort": DASHBOARD_PORT, "protocol": "TCP"}],
        "readinessProbe": {"httpGet": {"port": "http-dashboard", "path": "/health"},
                           "initialDelaySeconds": 0, "periodSeconds": 1, "timeoutSeconds": 300},
        "livenessProbe": {"httpGet": {"port": "http-dashboard", "path": "/health"},
                          "initialDelaySeconds": 15, "periodSeconds": 20},
    }
    sched_resources = _resources("scheduler_resources", scheduler_resources)
    if sched_resources:
        scheduler_container["resources"] = sched_resources
    metadata: dict[str, Any] = {"name": name, "labels": {LABEL_APP: "slide2vec-dask"}}
    if namespace:
        metadata["namespace"] = namespace
    return {
        "apiVersion": API_VERSION,
        "kind": "DaskCluster",
        "metadata": metadata,
        "spec": {
            "idleTimeout": idle_timeout,
            "worker": worker,
            "scheduler": {
                "metadata": {"labels": {LABEL_APP: "slide2vec-dask", "slide2vec-dask/role": "scheduler"}},
                "spec": {"containers": [scheduler_container]},
                "service": {
                    "type": scheduler_service_type,
                    "selector": {"dask.org/cluster-name": name, "dask.org/component": "scheduler"},
                    "ports": [{"name": "tcp-comm", "protocol": "TCP", "port": SCHEDULER_PORT,
                               "targetPort": "tcp-comm"},
                              {"name": "http-dashboard", "protocol": "TCP", "port": DASHBOARD_PORT,
                               "targetPort": "http-dashboard"}],
                },
            },
        },
    }


def gpu_worker_group_spec(cluster_name: str = "slide2vec", *, image: str, namespace: str | None = None,
                          n_gpu_workers: int = 1, gpu_resources: Mapping | None = None,
                          gpu_nthreads: int | None = None, gpu_node_selector: Mapping[str, str] | None = None,
                          gpu_tolerations: Sequence[Mapping] | None = None,
                          env: Mapping[str, Any] | Sequence[Mapping] | None = None,
                          volumes: Sequence[Mapping] | None = None,
                          volume_mounts: Sequence[Mapping] | None = None, group: str = GPU_GROUP) -> dict:
    """The ``DaskWorkerGroup`` resource of GPU workers, named ``<cluster_name>-<group>``.

    One GPU per worker pod: ``limits[nvidia.com/gpu]`` is 1 (added when
    ``gpu_resources`` does not name it) and the worker declares ``--resources
    GPU=1``; scale with ``n_gpu_workers``.  The GPU limit alone keeps the pods on
    GPU nodes; ``gpu_node_selector`` picks among them (e.g.
    ``{"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}``) and the default
    toleration lets them onto nodes tainted ``nvidia.com/gpu:NoSchedule`` (as GKE
    and many GPU node pools are); ``gpu_tolerations=[]`` adds none.
    ``gpu_nthreads``: decode threads, by default the CPU limit (else request),
    else 8.
    """
    cluster_name = _checked_name(cluster_name)
    _checked_name(f"{cluster_name}-{group}")
    _check_image(image)
    _check_count("n_gpu_workers", n_gpu_workers)
    resources = _gpu_resources(gpu_resources)
    nthreads = _nthreads("gpu_nthreads", gpu_nthreads, resources, default=DEFAULT_GPU_NTHREADS)
    worker = _worker(image, n_gpu_workers, resources, nthreads, _env(env), volumes, volume_mounts,
                     extra_args=["--resources", "GPU=1"],
                     labels={LABEL_APP: "slide2vec-dask", "slide2vec-dask/role": "gpu-worker"})
    pod = worker["spec"]
    if gpu_node_selector:
        pod["nodeSelector"] = {str(k): _label_value(v) for k, v in gpu_node_selector.items()}
    tolerations = DEFAULT_GPU_TOLERATIONS if gpu_tolerations is None else gpu_tolerations
    if tolerations:
        pod["tolerations"] = [dict(t) for t in tolerations]
    metadata: dict[str, Any] = {"name": f"{cluster_name}-{group}", "labels": {LABEL_APP: "slide2vec-dask"}}
    if namespace:
        metadata["namespace"] = namespace
    return {"apiVersion": API_VERSION, "kind": "DaskWorkerGroup", "metadata": metadata,
            "spec": {"cluster": cluster_name, "worker": worker}}


# -- the cluster ---------------------------------------------------------------------------------
# KubeCluster arguments that a custom cluster spec makes it ignore: accepting them would be a lie.
_SPEC_OWNED = frozenset({"resources", "worker_command", "custom_cluster_spec", "jupyter", "create_mode"})


def kubernetes_cluster(name: str = "slide2vec", *, image: str, namespace: str | None = None, n_workers: int = 1,
                       n_gpu_workers: int = 1, worker_resources: Mapping | None = None,
                       gpu_resources: Mapping | None = None, gpu_node_selector: Mapping[str, str] | None = None,
                       gpu_tolerations: Sequence[Mapping] | None = None,
                       env: Mapping[str, Any] | Sequence[Mapping] | None = None,
                       volumes: Sequence[Mapping] | None = None, volume_mounts: Sequence[Mapping] | None = None,
                       adapt: tuple[int, int] | None = None, worker_nthreads: int | None = None,
                       gpu_nthreads: int | None = None, scheduler_resources: Mapping | None = None,
                       scheduler_service_type: str = "ClusterIP", idle_timeout: int = 0, **kwargs):
    """A new Dask cluster on Kubernetes: scheduler, ``n_workers`` CPU and ``n_gpu_workers`` GPU workers.

    Needs the Dask operator installed in the cluster (see ``k8s/README.md``).
    ``adapt=(minimum, maximum)`` lets the operator scale the CPU group between
    those bounds; the GPU group (``<name>-gpu``, created even with
    ``n_gpu_workers=0``) stays at ``n_gpu_workers`` until ``cluster.scale(n,
    worker_group="gpu")`` changes it.  Other keyword arguments go to
    ``KubeCluster`` (``resource_timeout``, ``port_forward_cluster_ip``,
    ``shutdown_on_close``, ``quiet``, ...).  Run with
    ``ExecutionOptions(num_gpus=1)`` so embedding tasks go to the GPU workers.
    To reconnect to a running cluster use ``KubeCluster.from_name(name)``.
    """
    owned = sorted(_SPEC_OWNED & set(kwargs))
    if owned:
        raise TypeError(f"kubernetes_cluster() builds the DaskCluster spec and always creates a new cluster; "
                        f"{owned} cannot be passed through to KubeCluster (resources: use worker_resources / "
                        "gpu_resources; an existing cluster: KubeCluster.from_name(name))")
    bounds = _adapt_bounds(adapt)
    cluster_spec = kubernetes_cluster_spec(
        name, image=image, namespace=namespace, n_workers=n_workers, worker_resources=worker_resources,
        worker_nthreads=worker_nthreads, scheduler_resources=scheduler_resources, env=env, volumes=volumes,
        volume_mounts=volume_mounts, scheduler_service_type=scheduler_service_type, idle_timeout=idle_timeout)
    gpu_spec = gpu_worker_group_spec(
        name, image=image, namespace=namespace, n_gpu_workers=n_gpu_workers, gpu_resources=gpu_resources,
        gpu_nthreads=gpu_nthreads, gpu_node_selector=gpu_node_selector, gpu_tolerations=gpu_tolerations,
        env=env, volumes=volumes, volume_mounts=volume_mounts)
    KubeCluster, CreateMode = _require_operator()
    cluster = KubeCluster(custom_cluster_spec=cluster_spec, namespace=namespace,
                          create_mode=CreateMode.CREATE_ONLY, **kwargs)
    try:
        cluster.add_worker_group(GPU_GROUP, custom_spec=gpu_spec["spec"]["worker"])
        if bounds is not None:
            cluster.adapt(minimum=bounds[0], maximum=bounds[1])
    except BaseException:
        cluster.close()
        raise
    return cluster


def _require_operator():
    """``KubeCluster`` and its ``CreateMode``, or an ImportError that says what to install."""
    try:
        from dask_kubernetes import operator
        from dask_kubernetes.operator.kubecluster.kubecluster import CreateMode
    except ImportError as exc:
        raise ImportError(f"Kubernetes clusters need dask-kubernetes (the Dask operator client): {INSTALL}") from exc
    return operator.KubeCluster, CreateMode


# -- helpers -------------------------------------------------------------------------------------
def _worker(image, replicas, resources, nthreads, env_list, volumes, volume_mounts, extra_args, labels) -> dict:
    args = ["dask", "worker", "--name", "$(DASK_WORKER_NAME)", "--dashboard",
            "--dashboard-address", str(WORKER_DASHBOARD_PORT)]
    if nthreads is not None:
        args += ["--nthreads", str(nthreads)]
    container: dict[str, Any] = {
        "name": "worker", "image": image, "args": args + list(extra_args),
        "ports": [{"name": "http-dashboard", "containerPort": WORKER_DASHBOARD_PORT, "protocol": "TCP"}],
    }
    if env_list:
        container["env"] = env_list
    if resources:
        container["resources"] = resources
    pod: dict[str, Any] = {"containers": [container]}
    volumes, mounts = _volumes(volumes, volume_mounts)
    if mounts:
        container["volumeMounts"] = mounts
    if volumes:
        pod["volumes"] = volumes
    return {"replicas": replicas, "metadata": {"labels": dict(labels)}, "spec": pod}


def _checked_name(name: str) -> str:
    if not isinstance(name, str) or not _NAME.match(name):
        raise ValueError(f"cluster name {name!r} must be lowercase letters, digits and '-', start and end "
                         "alphanumeric, at most 53 characters (the scheduler Service is '<name>-scheduler')")
    return name


def _check_image(image: str) -> None:
    if not isinstance(image, str) or not image.strip() or any(c.isspace() for c in image):
        raise ValueError(f"image must be a container image reference like 'registry/slide2vec-dask:0.1.0', "
                         f"got {image!r}")


def _check_count(name: str, value: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError(f"{name} must be an integer >= 0, got {value!r}")


def _quantity(where: str, value) -> str:
    """A resource quantity as the string the CRD schema wants (it types them as strings)."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ValueError(f"{where}: a resource quantity must be a number or a string like '16Gi', got {value!r}")
    text = str(value).strip()
    if isinstance(value, float) and value.is_integer():
        text = str(int(value))
    if not _QUANTITY.match(text):
        raise ValueError(f"{where}: {value!r} is not a Kubernetes quantity (e.g. 4, '500m', '16Gi')")
    return text


def _resources(name: str, resources: Mapping | None) -> dict:
    if resources is None:
        return {}
    if not isinstance(resources, Mapping):
        raise ValueError(f"{name} must be a dict with 'limits' and/or 'requests', got {resources!r}")
    unknown = sorted(set(resources) - {"limits", "requests"})
    if unknown:
        raise ValueError(f"{name}: unknown key(s) {unknown}; only 'limits' and 'requests' are allowed")
    out = {}
    for part in ("limits", "requests"):
        values = resources.get(part)
        if values is None:
            continue
        if not isinstance(values, Mapping):
            raise ValueError(f"{name}[{part!r}] must be a dict like {{'cpu': 4, 'memory': '16Gi'}}")
        out[part] = {str(k): _quantity(f"{name}[{part!r}][{k!r}]", v) for k, v in values.items()}
    return out


def _gpu_resources(resources: Mapping | None) -> dict:
    out = _resources("gpu_resources", resources)
    limits = out.setdefault("limits", {})
    limits.setdefault(GPU_RESOURCE, "1")
    requested = out.get("requests", {}).get(GPU_RESOURCE, limits[GPU_RESOURCE])
    if limits[GPU_RESOURCE] != "1" or requested != "1":
        raise ValueError(f"gpu_resources: each GPU worker holds exactly one GPU ({GPU_RESOURCE}: 1, the worker "
                         f"declares --resources GPU=1 and runs one model); got limits "
                         f"{limits[GPU_RESOURCE]!r}, requests {requested!r}. Scale with n_gpu_workers instead.")
    return out


def _cpus(quantity: str) -> float:
    if quantity.endswith("m"):
        return float(quantity[:-1]) / 1000
    return float(quantity)


def _nthreads(name: str, nthreads: int | None, resources: dict, default: int | None) -> int | None:
    if nthreads is not None:
        if not isinstance(nthreads, int) or isinstance(nthreads, bool) or nthreads < 1:
            raise ValueError(f"{name} must be a positive integer, got {nthreads!r}")
        return nthreads
    cpu = resources.get("limits", {}).get("cpu") or resources.get("requests", {}).get("cpu")
    if cpu is None:
        return default
    try:
        return max(1, math.floor(_cpus(cpu)))
    except ValueError:
        raise ValueError(f"{name}: cannot read a CPU count from cpu={cpu!r}; pass {name} explicitly") from None


def _env(env) -> list[dict]:
    if env is None:
        return []
    if isinstance(env, Mapping):
        return [{"name": str(k), "value": str(v)} for k, v in env.items()]
    entries = [dict(e) for e in env]
    for entry in entries:
        if "name" not in entry or not ({"value", "valueFrom"} & set(entry)):
            raise ValueError(f"env entries need 'name' and 'value' or 'valueFrom', got {entry!r}")
    return entries


def _volumes(volumes, volume_mounts) -> tuple[list[dict], list[dict]]:
    volumes = [dict(v) for v in volumes or ()]
    mounts = [dict(m) for m in volume_mounts or ()]
    names = {v.get("name") for v in volumes}
    missing = sorted({str(m.get("name")) for m in mounts} - names)
    if missing:
        raise ValueError(f"volume_mounts name volumes that are not in volumes: {missing}")
    for mount in mounts:
        if "mountPath" not in mount:
            raise ValueError(f"volume mount {mount!r} needs a mountPath")
    return volumes, mounts


def _label_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"  # YAML's true is not the label "true"
    return str(value)


def _adapt_bounds(adapt) -> tuple[int, int] | None:
    if adapt is None:
        return None
    try:
        minimum, maximum = adapt
    except (TypeError, ValueError):
        raise ValueError(f"adapt must be (minimum, maximum) CPU workers, got {adapt!r}") from None
    for value in (minimum, maximum):
        _check_count("adapt bounds", value)
    if minimum > maximum:
        raise ValueError(f"adapt minimum {minimum} is above maximum {maximum}")
    return minimum, maximum
