"""Sweeps: a spec of every axis, a grid search on validation then all seeds, local or Ray execution, resume."""

from petlbench.sweep.spec import BackboneChoice, HyperGrid, SweepSpec, SweepSpecError, load_spec, parse_spec

__all__ = ["BackboneChoice", "HyperGrid", "SweepSpec", "SweepSpecError", "load_spec", "parse_spec"]
