"""The model pair and its on-disk form: the student beside its frozen reference per pipeline
chunk (:mod:`.model`), the vocab it holds (:mod:`.vocab`), Megatron-LM's checkpoint layout
(:mod:`.checkpoint`), where checkpoints lie (:mod:`.paths`) and what identifies a run's sources
(:mod:`.fingerprints`)."""
