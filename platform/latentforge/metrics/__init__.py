"""Sample-quality metrics (no Ray)."""
