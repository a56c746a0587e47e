"""Storage: URIs, the one fsspec/obstore entry point, retries, redaction, metrics, range readers,
and the stage cache. Knows nothing of slides or genomes."""
