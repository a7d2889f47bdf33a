"""Embed a manifest of slides on an HPC cluster through SLURM: GPU jobs embed, CPU jobs decode.

    python examples/slurm_hpc.py --manifest /shared/slides.csv --output-dir /shared/outputs/run1 \\
        --gpu-queue gpu --gpu-jobs 4 [--cpu-queue cpu --cpu-jobs 4] [--adapt 1 8]

Run it on a login node (or in a small job) of a cluster whose compute nodes see the same
paths (slides, output folder, this Python environment). Needs ``pip install
'slide2vec-dask[slurm]'``. Each GPU job asks SLURM for ``--gres=gpu:1`` and starts a Dask
worker declared ``--resources GPU=1``; embedding tasks go only there. Workers retire
gracefully before the walltime (``--lifetime``) and new jobs replace them.
The command-line equivalent: ``slide2vec-dask run config.yaml --cluster slurm`` with a
``cluster: {slurm: {...}}`` section.
"""

from __future__ import annotations

import argparse


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--manifest", required=True, help="CSV with sample_id,image_path (shared paths)")
    parser.add_argument("--output-dir", required=True, help="where embeddings.zarr and process_list.csv go")
    parser.add_argument("--preset", default="lunit", help="a model from `slide2vec-dask models` (default lunit)")
    parser.add_argument("--checkpoint", default=None, help="the preset's weights as a local file (default: the hub)")
    parser.add_argument("--gpu-queue", default=None, help="partition of the GPU jobs")
    parser.add_argument("--gpu-jobs", type=int, default=2, help="GPU worker jobs, one GPU each (default 2)")
    parser.add_argument("--cores", type=int, default=8, help="CPU cores per GPU job (they decode too)")
    parser.add_argument("--memory", default="64GB", help="memory per GPU job")
    parser.add_argument("--cpu-queue", default=None, help="partition of the CPU-only jobs (default: the GPU one)")
    parser.add_argument("--cpu-jobs", type=int, default=0, help="CPU-only worker jobs that decode (default 0)")
    parser.add_argument("--walltime", default="04:00:00", help="per job; workers retire before it")
    parser.add_argument("--account", default=None)
    parser.add_argument("--adapt", type=int, nargs=2, metavar=("MIN", "MAX"),
                        help="scale the GPU jobs between MIN and MAX instead of starting --gpu-jobs")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--log-directory", default=None, help="where the jobs' stdout/stderr go")
    args = parser.parse_args()

    # Imported after parsing so that --help works without dask-jobqueue installed.
    from distributed import Client

    from slide2vec_dask import ExecutionOptions, Model, Pipeline, PreprocessingConfig
    from slide2vec_dask.clusters import slurm_cluster

    cluster = slurm_cluster(gpu_jobs=args.gpu_jobs, cores=args.cores, memory=args.memory,
                            queue=args.gpu_queue, walltime=args.walltime, account=args.account,
                            cpu_jobs=args.cpu_jobs, cpu_queue=args.cpu_queue,
                            adapt=tuple(args.adapt) if args.adapt else None,
                            **({"log_directory": args.log_directory} if args.log_directory else {}))
    print(cluster.job_script())
    with cluster, Client(cluster) as client:
        print(f"Dask dashboard: {cluster.dashboard_link}")
        # With num_gpus=None the run detects GPUs from the workers present at its start;
        # blocks in flight then follow the cluster's threads as more jobs start.
        client.wait_for_workers(1, timeout=3600)
        pipeline = Pipeline(
            Model.from_preset(args.preset, checkpoint_path=args.checkpoint),
            preprocessing=PreprocessingConfig(requested_spacing_um=0.5, tissue_threshold=0.1),
            # num_gpus=None: the GPU workers' declared resources are used as they are.
            execution=ExecutionOptions(output_dir=args.output_dir, batch_size=args.batch_size),
            client=client,
        )
        result = pipeline.run(manifest_path=args.manifest)
    print(f"{result.num_failed} failed, {result.num_skipped} skipped; store {result.store_path}, "
          f"process list {result.process_list_path}")


if __name__ == "__main__":
    main()
