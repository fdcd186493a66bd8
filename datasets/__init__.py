"""Datasets: sources (folder layout, CSV manifest), splits, image loading, views, synthetic data, cards."""
