"""Ready-made Dask clusters for where the compute is: this machine, SLURM, Kubernetes.

Every helper returns a started cluster; hand it to ``distributed.Client``
and run a `Pipeline` (or any ``Model.embed_*``) inside ``with client:``,
or pass ``client=`` to `Pipeline`.  An existing scheduler needs no helper:
``ExecutionOptions(scheduler_address="tcp://host:8786")``.

dask-jobqueue and dask-kubernetes are optional: ``pip install
'slide2vec-dask[slurm]'`` / ``'slide2vec-dask[k8s]'``.
"""

from __future__ import annotations

from slide2vec_dask.config import ExecutionOptions
from slide2vec_dask.clusters.client import cluster_threads, default_threads, resolve_client, resolve_num_gpus
from slide2vec_dask.clusters.slurm import lifetime_for, slurm_cluster

KINDS = ("local", "slurm", "k8s")


def local_cluster(num_workers: int | None = None, num_gpus: int | None = None):
    """This machine: one worker process per GPU (``resources={"GPU": 1}``), else one CPU worker."""
    from slide2vec_dask.clusters.local import start_local_cluster   # (imports distributed)

    ExecutionOptions(num_workers=num_workers, num_gpus=num_gpus)   # the options' own checks
    return start_local_cluster(num_workers, resolve_num_gpus(num_gpus, None))


def kubernetes_cluster(*args, **kwargs):
    """The Dask Kubernetes operator's `KubeCluster` with a GPU worker group (see `.kubernetes`)."""
    from slide2vec_dask.clusters.kubernetes import kubernetes_cluster as make

    return make(*args, **kwargs)


def make_cluster(kind: str, **options):
    """A started cluster of ``kind`` (``"local"``, ``"slurm"`` or ``"k8s"``) built from ``options``."""
    makers = {"local": local_cluster, "slurm": slurm_cluster, "k8s": kubernetes_cluster}
    if kind not in makers:
        raise ValueError(f"cluster kind must be one of {KINDS} (or a scheduler address 'tcp://host:port'), "
                         f"got {kind!r}")
    import inspect

    try:
        inspect.signature(makers[kind]).bind(**options)
    except TypeError as exc:
        raise ValueError(f"bad options for a {kind!r} cluster: {exc}") from exc
    return makers[kind](**options)


__all__ = ["KINDS", "resolve_client", "cluster_threads", "default_threads", "resolve_num_gpus", "make_cluster", "local_cluster", "slurm_cluster", "kubernetes_cluster", "lifetime_for"]
