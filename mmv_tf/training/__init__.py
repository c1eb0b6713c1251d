"""Training: strategies, optimizers, schedules and the contrastive pretraining loop."""
