"""SD3-family tiny models (placeholder module: the SD3.5 builder registers here)."""
