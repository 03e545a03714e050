"""SFT data: records from JSONL/Parquet/datasets (:mod:`.records`), prompt/chat formatting and
loss masks (:mod:`.formatting`), packing (:mod:`.packing`), the tokenised cache (:mod:`.cache`),
the data set and its batch order (:mod:`.dataset`), and the embedded synthetic world
(:mod:`.synthetic`)."""
