"""Z-Image tiny model (placeholder module: its builder registers here)."""
