"""The per-worker engine: the overlapped pipeline, the model stage, the device stage, the shard worker."""
