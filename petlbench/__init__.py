"""petlbench: compare parameter-efficient transfer learning methods on high-resolution images."""

__version__ = "0.1.0"

import warnings as _warnings

# torch imports pynvml, whose 13.x shim warns that it is deprecated; the module it provides is nvidia-ml-py's.
_warnings.filterwarnings("ignore", message="The pynvml package is deprecated", category=FutureWarning)
