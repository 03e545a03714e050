"""A run's numbers, written and read back: the trackers a training run logs to (TensorBoard,
Weights & Biases, MLflow) and the report drawn from its metrics file."""
