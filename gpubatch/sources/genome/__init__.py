"""Genomes as a Source: references, regions, variants, and ingest into a genome zarr."""
