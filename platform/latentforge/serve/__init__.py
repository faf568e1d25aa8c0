"""Ray Serve: generation and editing endpoints over the registry (engine.py is Ray-free)."""
