"""The run summary, the bottleneck verdict, and their renderings (frames, terminal text, HTML)."""
