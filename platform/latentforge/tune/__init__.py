"""Hyperparameter sweeps: search spaces and the instability policy (pure), Ray Tune wiring,
promotion of the best trial to the registry."""
