"""The model pair and its on-disk form: the student beside its frozen reference per pipeline
chunk (:mod:`.model`) and Megatron-LM's checkpoint layout (:mod:`.checkpoint`)."""
