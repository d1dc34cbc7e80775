"""Training: batch sources, sequence-extension batching, the update, checkpoints, the loop."""
