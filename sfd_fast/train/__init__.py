"""Long runs around train_step: the distill loop, checkpoints, resume, distributed, teacher pretraining."""
