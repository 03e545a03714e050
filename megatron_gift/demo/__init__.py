"""The embedded demo, above the engine: an arithmetic world (:mod:`.synthetic`: problems, solution
styles, the corpus and demonstrations; :mod:`.chains`: longer chains and a style classifier;
:mod:`.audit`: the reproduction study's "audit chains" world) and the default job that
``megatron-gift train`` runs when it names no job (:mod:`.default_run`: stage 1 builds a tiny
base model, stage 2 is GIFT from it). Nothing below this package imports it; evaluation takes
its style classifier as a plug-in."""
