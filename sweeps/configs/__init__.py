"""One module per experiment, each defining SWEEP (see sweeps/spec.py)."""
