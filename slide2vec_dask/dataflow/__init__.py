"""The Dask dataflow: graphs over slide blocks, worker-side model cache, executors."""
