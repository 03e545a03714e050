"""The memory planner behind ``megatron-gift plan``: what a run needs per GPU before it starts,
read from its config alone (:mod:`.memory`: the model of every part, the cheapest layout that
fits, the time a stopping run needs), and the plan as a table (:mod:`.table`). Plain Python:
it imports neither torch nor Megatron-Core."""
