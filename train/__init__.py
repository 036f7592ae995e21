"""Training on shards (streaming, end-to-end fine-tuning, evaluation) and the ``mmfuse`` command line."""
