"""Array kernels of the device stage: numpy reference implementations and their CuPy twins."""
