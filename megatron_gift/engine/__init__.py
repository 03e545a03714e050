"""The trainer: where weights come from (:mod:`.sources`), the forward step inside Megatron's
schedules (:mod:`.pipeline`), the training loop (:mod:`.trainer`), stop signals
(:mod:`.signals`), metrics (:mod:`.metrics`) and the embedded default job (:mod:`.default_run`)."""
