"""Model and storage I/O: fsspec storage (``storage``) and model sources (``sources``)."""
