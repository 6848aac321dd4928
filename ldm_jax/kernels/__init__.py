"""Hand-picked kernels that XLA calls through its FFI (CPU only, optional)."""
