"""The engine: one training step, the training protocol, running a request, metrics and parameter counts."""
