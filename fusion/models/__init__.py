"""One self-contained file per fusion model; ``fusion.MODELS`` is the registry."""
