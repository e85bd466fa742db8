"""Paper figures drawn from stored sweep results. Figure scripts never train: `python -m
figures` runs whatever sweeps are missing (through the sweep runner), then draws."""
