"""The loop, each method's step, the loss, evaluation and metrics."""
