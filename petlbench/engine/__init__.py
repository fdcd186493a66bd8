"""The engine: one training step, the training protocol and its callbacks, running a request, metrics, predict."""
