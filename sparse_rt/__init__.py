"""sparse-rt: split computing for PyTorch over ZeroMQ."""
