"""SFT data: records from JSONL/Parquet/datasets (:mod:`.records`), prompt/chat formatting and
loss masks (:mod:`.formatting`), packing (:mod:`.packing`), the tokenised cache (:mod:`.cache`),
and the data set and its batch order (:mod:`.dataset`). The embedded arithmetic world is the
demo's (:mod:`megatron_gift.demo.synthetic`)."""
