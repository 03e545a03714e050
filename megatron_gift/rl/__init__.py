"""After GIFT: the RL stage's start, a NeMo RL GRPO config over the run's checkpoint
(:mod:`.handoff`)."""
