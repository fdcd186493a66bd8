"""Datasets: sources (folder layout, CSV manifest, flat folder), splits, image loading, views, checks, cards."""
