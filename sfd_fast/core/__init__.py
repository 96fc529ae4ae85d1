"""The method: config, losses, conditions, state, and train_step (reference and fast paths)."""
