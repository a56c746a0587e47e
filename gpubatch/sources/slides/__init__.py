"""Whole-slide images as a Source: backends, tile grids, tissue masks, local/streamed/staged opening."""
