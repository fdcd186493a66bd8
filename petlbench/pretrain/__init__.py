"""Formula-driven pre-training: a small ViT LPM learned from generated images (FractalDB / RCDB style)."""
