"""The columns of the GIFT loss's statistics pass, ``[rows, STAT_COLUMNS]`` per rank: each a sum
over this rank's vocabulary shard, shifted by the row's maxima (``z``: student logits, ``r``:
reference logits, ``y``: the label). A leaf: the passes and their implementations share it."""

SUM_EXP_Z = 0  # sum_v exp(z_v)
Z_LABEL = 1  # z_y where this rank owns the label, else 0
DOT_EXP_Z_Z = 2  # sum_v exp(z_v) z_v                      (diagnostics only)
R_LABEL = 3  # r_y where this rank owns the label, else 0
SUM_EXP_R = 4  # sum_v exp(r_v)
DOT_EXP_R_Z = 5  # sum_v exp(r_v) z_v
SUM_Z = 6  # sum_v z_v                                      (smoothing only)
STAT_COLUMNS = 7
