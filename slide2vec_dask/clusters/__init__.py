"""Clusters, in one home: which one runs a call (`client`), ready-made ones for where the compute
is (this machine: `local`; SLURM: `slurm`; Kubernetes: `kubernetes`).

Every helper returns a started cluster; hand it to ``distributed.Client``
and run a `Pipeline` (or any ``Model.embed_*``) inside ``with client:``,
or pass ``client=`` to `Pipeline`.  An existing scheduler needs no helper:
``ExecutionOptions(scheduler_address="tcp://host:8786")``.

dask-jobqueue and dask-kubernetes are optional: ``pip install
'slide2vec-dask[slurm]'`` / ``'slide2vec-dask[k8s]'``.
"""

from __future__ import annotations

from slide2vec_dask.config import ExecutionOptions
from slide2vec_dask.clusters.kubernetes import kubernetes_cluster
from slide2vec_dask.clusters.client import cluster_threads, default_threads, resolve_client, resolve_num_gpus

KINDS = ("local", "slurm", "k8s")


def local_cluster(num_workers: int | None = None, num_gpus: int | None = None):
    """This machine: one worker process per GPU (``resources={"GPU": 1}``), else one CPU worker."""
    from slide2vec_dask.clusters.local import start_local_cluster   # (imports distributed)

    ExecutionOptions(num_workers=num_workers, num_gpus=num_gpus)   # the options' own checks
    return start_local_cluster(num_workers, resolve_num_gpus(num_gpus, None))


def __getattr__(name: str):
    # SLURM's helpers import dask (~0.5 s): loaded when first asked for, so that resolving a
    # client (`clusters.client`, on every embedding call) costs nothing.
    if name in ("slurm_cluster", "lifetime_for"):
        from slide2vec_dask.clusters import slurm

        return getattr(slurm, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def make_cluster(kind: str, **options):
    """A started cluster of ``kind`` (``"local"``, ``"slurm"`` or ``"k8s"``) built from ``options``."""
    if kind not in KINDS:
        raise ValueError(f"cluster kind must be one of {KINDS} (or a scheduler address 'tcp://host:port'), "
                         f"got {kind!r}")
    import inspect

    if kind == "slurm":
        from slide2vec_dask.clusters.slurm import slurm_cluster as maker   # (imports dask)
    else:
        maker = kubernetes_cluster if kind == "k8s" else local_cluster
    try:
        inspect.signature(maker).bind(**options)
    except TypeError as exc:
        raise ValueError(f"bad options for a {kind!r} cluster: {exc}") from exc
    return maker(**options)


__all__ = ["KINDS", "make_cluster", "local_cluster", "slurm_cluster", "kubernetes_cluster", "lifetime_for",
           "resolve_client", "cluster_threads", "default_threads", "resolve_num_gpus"]
