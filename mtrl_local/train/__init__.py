"""Training: batching by sequence extension, checkpoints, the policy, rollout sources, the loop."""
