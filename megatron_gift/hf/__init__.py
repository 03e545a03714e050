"""Hugging Face <-> Megatron-Core: supported architectures and their config mapping
(:mod:`.architecture`), weight conversion both ways and the conversion cache (:mod:`.convert`)."""
