"""The trainer: the run settled once (:mod:`.run_spec`), which job a command line names
(:mod:`.job`), where weights come from (:mod:`.sources`), the forward step inside Megatron's
schedules (:mod:`.pipeline`), the training loop (:mod:`.trainer`), stop signals
(:mod:`.signals`) and metrics (:mod:`.metrics`)."""
