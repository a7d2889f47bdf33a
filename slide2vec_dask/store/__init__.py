"""The run's Zarr store: `EmbeddingStore` owns the layout; `open_embeddings` is the user's view."""

from slide2vec_dask.store.embedding_store import (PATIENT_ROWS, SLIDE_ROWS, STORE_NAME, WORK_NAME, EmbeddingStore,
                                                  StoreLayoutError, open_embeddings, store_path)

__all__ = ["EmbeddingStore", "open_embeddings", "store_path", "STORE_NAME", "WORK_NAME", "SLIDE_ROWS",
           "PATIENT_ROWS", "StoreLayoutError"]
