"""After GIFT: the RL stage's start, a NeMo RL GRPO config over the run's checkpoint
(:mod:`.handoff`) or a NeMo 1.x export with a REINFORCE/PPO config for NeMo-Aligner
(:mod:`.nemo_aligner`)."""
