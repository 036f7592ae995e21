"""Training on shards: streaming, end-to-end fine-tuning, evaluation, prediction; ``mmfuse train|eval|predict``."""
