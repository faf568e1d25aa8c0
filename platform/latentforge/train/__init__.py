"""Training: the shared loop (no Ray), the single-process runner and the Ray Train wiring."""
