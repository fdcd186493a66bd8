"""The core: the method contract and registry, options, run configuration, results store, provenance, atomic IO."""
