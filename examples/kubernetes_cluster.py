"""Embed a manifest of slides on Kubernetes from Python: start a Dask cluster, run, tear down.

    python examples/kubernetes_cluster.py --image REGISTRY/slide2vec-dask:0.1.0 \\
        --manifest /data/slides.csv --output-dir /data/outputs/run1 [--gpu-workers 2 --cpu-workers 2]

Needs the Dask Kubernetes operator in the cluster and ``pip install 'slide2vec-dask[k8s]'``
here (see k8s/README.md). Run it where the slides and the output folder have the same paths
as in the workers — typically a pod that mounts the same ReadWriteMany claim at /data, with
a service account allowed to create DaskCluster and DaskWorkerGroup resources. The job in
k8s/job.yaml does the same with plain manifests and the command line.
"""

from __future__ import annotations

import argparse


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image", required=True, help="the image built from ../Dockerfile")
    parser.add_argument("--manifest", required=True, help="CSV with sample_id,image_path (paths as the workers see them)")
    parser.add_argument("--output-dir", required=True, help="where embeddings.zarr and process_list.csv go")
    parser.add_argument("--preset", default="lunit", help="a model from `slide2vec-dask models` (default lunit)")
    parser.add_argument("--name", default="slide2vec", help="DaskCluster name (default slide2vec)")
    parser.add_argument("--namespace", default=None, help="default: the current kubeconfig/pod namespace")
    parser.add_argument("--cpu-workers", type=int, default=2, help="CPU workers that read and decode (default 2)")
    parser.add_argument("--gpu-workers", type=int, default=1, help="GPU workers, one GPU each (default 1)")
    parser.add_argument("--adapt", type=int, nargs=2, metavar=("MIN", "MAX"),
                        help="let the operator scale the CPU workers between MIN and MAX")
    parser.add_argument("--claim", default="slide2vec-data", help="ReadWriteMany PVC with slides and outputs")
    parser.add_argument("--mount", default="/data", help="where the claim is mounted in the workers")
    parser.add_argument("--batch-size", type=int, default=128)
    args = parser.parse_args()

    # Imported after parsing so that --help works without dask-kubernetes installed.
    from distributed import Client

    from slide2vec_dask import ExecutionOptions, Model, Pipeline, PreprocessingConfig
    from slide2vec_dask.clusters.kubernetes import kubernetes_cluster

    cluster = kubernetes_cluster(
        args.name,
        image=args.image,
        namespace=args.namespace,
        n_workers=args.cpu_workers,
        n_gpu_workers=args.gpu_workers,
        worker_resources={"requests": {"cpu": 4, "memory": "16Gi"}, "limits": {"cpu": 4, "memory": "16Gi"}},
        gpu_resources={"requests": {"cpu": 8, "memory": "48Gi"},
                       "limits": {"cpu": 8, "memory": "48Gi", "nvidia.com/gpu": 1}},
        env={"HF_HOME": f"{args.mount}/hf-cache"},  # preset weights cached on the shared volume
        volumes=[{"name": "data", "persistentVolumeClaim": {"claimName": args.claim}}],
        volume_mounts=[{"name": "data", "mountPath": args.mount}],
        adapt=tuple(args.adapt) if args.adapt else None,
    )
    with cluster, Client(cluster) as client:
        print(f"Dask dashboard: {cluster.dashboard_link}")
        # Wait for the workers: with num_gpus=None the run sends embeddings to GPU workers
        # when the workers present at its start declare GPUs.  Blocks in flight then
        # follow the cluster's threads as more workers join.
        client.wait_for_workers(args.gpu_workers + (args.adapt[0] if args.adapt else args.cpu_workers),
                                timeout=1800)
        pipeline = Pipeline(
            # with no GPU workers, embed on the CPUs (device="cpu")
            Model.from_preset(args.preset, device=None if args.gpu_workers else "cpu"),
            preprocessing=PreprocessingConfig(requested_spacing_um=0.5, tissue_threshold=0.1),
            # num_gpus=1: embedding tasks ask for resources={"GPU": 1}, which only the GPU
            # workers (--resources GPU=1) have.
            execution=ExecutionOptions(output_dir=args.output_dir, batch_size=args.batch_size,
                                       num_gpus=1 if args.gpu_workers else None),
            client=client,
        )
        result = pipeline.run(manifest_path=args.manifest)
    print(f"{len(result.tile_artifacts)} slides embedded or already complete, {result.num_failed} failed; "
          f"store {result.store_path}, process list {result.process_list_path}")


if __name__ == "__main__":
    main()
