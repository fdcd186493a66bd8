"""petlbench: compare parameter-efficient transfer learning methods on high-resolution images."""

__version__ = "0.1.0"
