"""The run configuration: one typed dataclass per section, every field documented.

A run is described by nine sections (``model``, ``parallel``, ``gift``, ``data``, ``training``,
``precision``, ``optimizer``, ``checkpoint``, ``logging``), each a dataclass below; :class:`JobConfig` holds
them. ``OmegaConf.structured(JobConfig)`` is the schema every recipe, flag and override is merged
into, so a value of the wrong type or an unknown key is refused where it enters, naming it.

Each field's ``help`` is what ``--help`` prints; ``choices`` lists the values a string field
takes; ``flag`` names its command-line flag where it differs from ``--key-with-dashes``
(Megatron-LM's spelling is kept throughout).
"""

from dataclasses import Field, dataclass, field, fields
from typing import TYPE_CHECKING, Any, Optional

if TYPE_CHECKING:
    from omegaconf import DictConfig

SECTIONS = ("model", "parallel", "gift", "lora", "data", "training", "precision", "optimizer",
            "checkpoint", "logging")


def option(default: Any, help: str, choices: Optional[tuple[str, ...]] = None,
           flag: Optional[str] = None) -> Any:
    """A documented config field: ``default``, its ``help`` text, allowed ``choices``, and the
    flag name when it is not ``--key-with-dashes``."""
    return field(default=default, metadata={"help": help, "choices": choices, "flag": flag})


@dataclass
class Model:
    """The transformer (Llama-style: RoPE, RMSNorm, SwiGLU, GQA). From a Hugging Face base model
    the architecture keys are read from its config.json."""

    num_layers: int = option(4, "transformer layers")
    hidden_size: int = option(64, "hidden size h")
    num_attention_heads: int = option(4, "query heads")
    num_query_groups: int = option(2, "key/value heads (GQA groups)")
    ffn_hidden_size: int = option(176, "SwiGLU inner size")
    seq_length: int = option(48, "tokens per sequence")
    rotary_base: float = option(10000.0, "RoPE base (theta)")
    norm_epsilon: float = option(1e-5, "RMSNorm epsilon")
    init_method_std: float = option(0.02, "std of the random initialisation")
    untie_embeddings_and_output_weights: bool = option(True, "separate input and output embeddings")
    make_vocab_size_divisible_by: int = option(
        128, "pad the vocab to a multiple of this that TP divides (padding takes no part in the loss)")
    tokenizer: Optional[str] = option(
        None, "Hugging Face tokenizer directory; default: the base model's, else the bundled one")
    family: str = option("llama", "HF architecture of exports (set from an HF base model)",
                         choices=("llama", "qwen2", "qwen3", "qwen3_moe", "mistral"))
    kv_channels: Optional[int] = option(None, "head dim; default hidden_size / num_attention_heads")
    rope_scaling_factor: Optional[float] = option(None, "Llama 3.x RoPE scaling factor")
    add_qkv_bias: bool = option(False, "bias on the QKV projection (Qwen2)")
    qk_layernorm: bool = option(False, "RMSNorm on each head's query and key before RoPE "
                                "(Qwen3)")
    num_moe_experts: Optional[int] = option(
        None, "experts of each mixture-of-experts layer (Qwen3-MoE); none: dense MLPs")
    moe_router_topk: int = option(2, "experts each token is routed to")
    moe_ffn_hidden_size: Optional[int] = option(
        None, "each expert's SwiGLU inner size; default ffn_hidden_size")
    moe_layer_freq: str = option(
        "1", "which layers are MoE (the others dense): every k-th (an integer) or one 0/1 per "
        "layer, e.g. [0,1,1,1] (Megatron-LM's --moe-layer-freq)")
    moe_norm_topk_prob: bool = option(
        True, "renormalise each token's top-k routing probabilities to sum to 1 (Qwen3-MoE's "
        "norm_topk_prob)")
    vocab_size: Optional[int] = option(None, "the real vocab (padded by the model); default: the tokenizer's")
    sliding_window: Optional[int] = option(
        None, "Mistral's attention window; seq_length may not exceed it")


@dataclass
class Parallel:
    """Model parallelism; data parallel is the rest of the world."""

    tensor_model_parallel_size: int = option(1, "TP: shards of every layer and of the vocab")
    pipeline_model_parallel_size: int = option(1, "PP: pipeline stages")
    virtual_pipeline_model_parallel_size: Optional[int] = option(
        None, "VPP: model chunks per pipeline stage (interleaved schedule)")
    sequence_parallel: bool = option(
        False, "SP: shard layer norms, dropout and the activations between TP regions over the "
        "sequence (needs TP > 1)")
    context_parallel_size: int = option(
        1, "CP: shard the sequence over this many ranks in attention (needs Transformer Engine "
        "and CUDA)")
    use_distributed_optimizer: bool = option(
        False, "shard optimizer state over data parallel ranks (needs CUDA)")
    overlap_grad_reduce: bool = option(
        False, "overlap the data-parallel gradient reduce with the backward (needs CUDA)")
    overlap_param_gather: bool = option(
        False, "overlap the distributed optimizer's parameter all-gather with the forward "
        "(needs --use-distributed-optimizer)")
    grad_reduce_in_fp32: bool = option(
        True, "reduce gradients over data parallel ranks in fp32 (bf16 runs)")
    expert_model_parallel_size: int = option(
        1, "EP: the experts of each MoE layer split over this many ranks (inside data "
        "parallelism, as Megatron-Core lays them out)")
    expert_tensor_parallel_size: Optional[int] = option(
        None, "TP of each expert; default the tensor-parallel size")


@dataclass
class Gift:
    """The GIFT target q = softmax(log p_ref + beta * onehot(y)), p_ref smoothed by lambda."""

    beta: float = option(20.0, "finite temperature; inf is plain cross-entropy SFT (no reference)")
    smooth_lambda: float = option(
        0.0, "mix the reference with uniform: (1 - lambda) p_ref + lambda / V; in [0, 1] "
        "(0.01 for Llama)")
    reference_load: Optional[str] = option(
        None, "frozen reference (Megatron checkpoint or HF directory); default: the pretrained "
        "checkpoint, else --load", flag="--reference-load")
    loss_implementation: str = option(
        "auto", "passes over the logits: fused Triton kernels (CUDA), eager PyTorch, or auto "
        "(Triton on CUDA where installed, else eager)", choices=("auto", "triton", "eager"),
        flag="--gift-loss-implementation")
    head: str = option(
        "logits", "how the loss meets the output layer: logits (materialised, then the loss) or "
        "fused (hidden states and output weights in, logits never held beyond a chunk of "
        "--gift-head-chunk-tokens)", choices=("logits", "fused"), flag="--gift-head")
    head_chunk_tokens: Optional[int] = option(
        None, "tokens per chunk of the fused head; default: as many as keep one fp32 "
        "[chunk, V/tp] tile within 128 MiB", flag="--gift-head-chunk-tokens")
    soft_sft_weight: Optional[float] = option(
        None, "a constant weight w on the reference for every token, q = (1 - w) onehot + w "
        "p_ref: the soft-SFT control (beta is then unused but must be finite, so that the "
        "reference is loaded); in [0, 1]; logits head only", flag="--gift-soft-sft-weight")


@dataclass
class Data:
    """SFT data: JSONL, Parquet or a datasets.save_to_disk directory."""

    train_path: Optional[str] = option(None, "training data file or directory")
    valid_path: Optional[str] = option(None, "validation data (enables evaluation)")
    split: str = option("train", "split of a DatasetDict directory")
    prompt_field: str = option("prompt", "prompt column of prompt/response records")
    response_field: str = option("response", "response column (the loss covers it)")
    messages_field: str = option(
        "messages", "chat column: a list of {role, content}; loss on assistant turns")
    text_field: Optional[str] = option(None, "raw-text column: plain next-token training")
    overlong: str = option("truncate", "a sample longer than seq_length + 1",
                           choices=("truncate", "reject"))
    malformed: str = option("reject", "a malformed record", choices=("reject", "skip"))
    pack: bool = option(False, "several samples per sequence, attention kept inside each")
    cache_dir: Optional[str] = option(
        None, "tokenised-data cache; default $MEGATRON_GIFT_CACHE/data or ~/.cache/megatron_gift/data")


@dataclass
class Training:
    """Batches, length, precision, evaluation."""

    micro_batch_size: int = option(4, "sequences per micro-batch")
    global_batch_size: int = option(16, "sequences per step: micro-batch x micro-batches x DP")
    train_iters: int = option(100, "optimizer steps in total")
    seed: int = option(1234, "seed of initialisation and data order")
    bf16: bool = option(False, "bf16 parameters and activations (fp32 main weights)")
    eval_interval: int = option(50, "evaluate every N iterations (and at the end)")
    eval_iters: int = option(4, "global batches per evaluation")
    moe_aux_loss_coeff: float = option(
        0.0, "weight of the student's MoE load-balancing loss, added to GIFT's (0: none)")
    moe_router_load_balancing_type: str = option(
        "aux_loss", "the load-balancing loss (Megatron-LM's): per batch, per sequence, or none",
        choices=("aux_loss", "seq_aux_loss", "none"))
    exit_duration_in_mins: Optional[float] = option(
        None, "save and exit cleanly once the run has trained this many minutes (all ranks "
        "agree on the iteration)")
    exit_interval: Optional[int] = option(
        None, "save and exit cleanly at the first iteration that is a multiple of this")
    recompute_granularity: Optional[str] = option(
        None, "activation recompute of the student (the reference keeps no activations): "
        "selective (core attention) or full (whole layers)", choices=("full", "selective"))
    recompute_method: Optional[str] = option(
        None, "full recompute: uniform (every N layers one checkpoint) or block (the first N "
        "layers of each stage)", choices=("uniform", "block"))
    recompute_num_layers: Optional[int] = option(
        None, "full recompute: N of --recompute-method")


@dataclass
class Precision:
    """FP8 through Transformer Engine (Megatron-Core's TransformerConfig fp8 fields): the
    transformer layers' GEMMs in FP8; the embedding, the output layer and the loss stay bf16/fp32.
    Needs Transformer Engine and --bf16."""

    fp8_format: Optional[str] = option(
        None, "run the transformer layers in FP8: e4m3 everywhere, or hybrid (e4m3 forward, e5m2 "
        "gradients); default: no FP8", choices=("e4m3", "hybrid"))
    fp8_recipe: str = option(
        "delayed", "FP8 scaling: delayed (from an amax history), tensorwise (current scaling), "
        "blockwise, mxfp8 (Blackwell)", choices=("delayed", "tensorwise", "blockwise", "mxfp8"))
    fp8_margin: int = option(0, "delayed scaling: scale margin (powers of 2)")
    fp8_amax_history_len: int = option(1, "delayed scaling: amax history length")
    fp8_amax_compute_algo: str = option(
        "most_recent", "delayed scaling: amax from the history", choices=("most_recent", "max"))
    first_last_layers_bf16: bool = option(
        False, "keep the first and last layers in bf16 (not with delayed scaling)")
    num_layers_at_start_in_bf16: int = option(
        1, "with --first-last-layers-bf16: bf16 layers at the start")
    num_layers_at_end_in_bf16: int = option(
        1, "with --first-last-layers-bf16: bf16 layers at the end")
    fp8_param_gather: bool = option(
        False, "keep the student's GEMM weights in FP8 and all-gather them in FP8 (needs "
        "--use-distributed-optimizer)")
    reference_precision: str = option(
        "bf16", "the frozen reference's layers: bf16, or fp8 (the student's recipe, with a "
        "scaling state of its own)", choices=("bf16", "fp8"))
    reference_fp8_weights: bool = option(
        False, "with --reference-precision fp8: keep the reference's GEMM weights in FP8 (1 "
        "byte a weight instead of 2, plus the transpose Transformer Engine keeps on Hopper; "
        "quantized once, when loaded: not with delayed scaling)")


@dataclass
class Optimizer:
    """Megatron-Core's optimizer and OptimizerParamScheduler."""

    optimizer: str = option("adam", "the update rule", choices=("adam", "sgd"))
    lr: float = option(1e-3, "peak learning rate")
    min_lr: float = option(0.0, "learning rate at the end of the decay (<= lr)")
    lr_warmup_iters: int = option(0, "linear warm-up iterations")
    lr_decay_style: str = option("cosine", "decay after warm-up",
                                 choices=("constant", "linear", "cosine"))
    weight_decay: float = option(0.01, "decoupled weight decay")
    adam_beta1: float = option(0.9, "Adam beta1")
    adam_beta2: float = option(0.95, "Adam beta2")
    sgd_momentum: float = option(0.9, "SGD momentum")
    clip_grad: float = option(1.0, "clip the global gradient norm to this (0: off)")
    override_opt_param_scheduler: bool = option(
        False, "on resume, take lr, min_lr, warm-up, decay style and train_iters from this "
        "command instead of refusing a change to them", flag="--override-opt-param-scheduler")


LORA_TARGETS = ("linear_qkv", "linear_proj", "linear_fc1", "linear_fc2")  # Megatron-Core's


@dataclass
class Lora:
    """LoRA GIFT: adapters on the student's linears, the base frozen; the reference is the
    student with its adapters off (no second copy of the weights)."""

    rank: Optional[int] = option(None, "adapter rank r; none: full-parameter training",
                                 flag="--lora-rank")
    alpha: float = option(32.0, "the adapters' update is scaled by alpha / r",
                          flag="--lora-alpha")
    dropout: float = option(0.0, "dropout on the adapters' input", flag="--lora-dropout")
    target_modules: str = option(
        "linear_qkv,linear_proj,linear_fc1,linear_fc2", "the linears that take adapters, "
        "comma-separated (Megatron-Core's names)", flag="--lora-target-modules")


@dataclass
class Checkpoint:
    """Megatron-LM's checkpoint layout (torch_dist), loadable at any TP/PP."""

    save: Optional[str] = option(None, "directory to save checkpoints in")
    load: Optional[str] = option(None, "resume the run saved in this directory")
    pretrained_checkpoint: Optional[str] = option(
        None, "initial weights only: a Megatron checkpoint or a Hugging Face model directory")
    save_interval: Optional[int] = option(None, "save every N iterations (and at the end)")
    converter: str = option(
        "auto", "how a Hugging Face directory (pretrained or reference) is converted: builtin, "
        "or bridge (Megatron-Bridge's AutoBridge); auto takes bridge where it is installed",
        choices=("auto", "builtin", "bridge"))


@dataclass
class Logging:
    """Console, TensorBoard, Weights & Biases, MLflow and the metrics file (global rank 0 writes
    them)."""

    tensorboard_dir: Optional[str] = option(None, "TensorBoard log directory")
    wandb_project: Optional[str] = option(
        None, "Weights & Biases project to log to (off when unset; needs the wandb package)")
    wandb_exp_name: Optional[str] = option(
        None, "W&B run name; default: the save directory's name")
    wandb_save_dir: Optional[str] = option(
        None, "directory for W&B's local files; default SAVE/wandb")
    mlflow_tracking_uri: Optional[str] = option(
        None, "MLflow tracking server or store to log to (off unless this or --mlflow-experiment "
        "is set; default: MLFLOW_TRACKING_URI; needs the mlflow-skinny package)")
    mlflow_experiment: Optional[str] = option(
        None, "MLflow experiment name; default: MLFLOW_EXPERIMENT_NAME, else MLflow's Default")
    mlflow_run_name: Optional[str] = option(
        None, "MLflow run name; default: the save directory's name")
    metrics_file: Optional[str] = option(None, "JSON lines, one object per logged iteration")
    log_interval: int = option(1, "log every N iterations")
    progress: bool = option(True, "show the progress bar")
    log_level: str = option(
        "info", "console verbosity; debug logs every rank", choices=("debug", "info", "warning"))


@dataclass
class JobConfig:
    """A whole run: one field per section."""

    model: Model = field(default_factory=Model)
    parallel: Parallel = field(default_factory=Parallel)
    gift: Gift = field(default_factory=Gift)
    lora: Lora = field(default_factory=Lora)
    data: Data = field(default_factory=Data)
    training: Training = field(default_factory=Training)
    precision: Precision = field(default_factory=Precision)
    optimizer: Optimizer = field(default_factory=Optimizer)
    checkpoint: Checkpoint = field(default_factory=Checkpoint)
    logging: Logging = field(default_factory=Logging)


def section_fields(section: str) -> tuple[Field[Any], ...]:
    """The dataclass fields of ``section`` (``dataclasses.Field``, with ``metadata``)."""
    return fields(JobConfig.__dataclass_fields__[section].default_factory)


def flag_name(section: str, key: str) -> str:
    """The command-line flag of ``section.key``: Megatron-LM's spelling."""
    meta = JobConfig.__dataclass_fields__[section].default_factory.__dataclass_fields__[key].metadata
    if meta.get("flag"):
        return meta["flag"]
    prefix = "--gift-" if section == "gift" else "--"
    return prefix + key.replace("_", "-")


def from_container(values: dict) -> "DictConfig":
    """A structured run config from a plain dict (e.g. the config a checkpoint stored);
    keys it lacks take their defaults."""
    from omegaconf import OmegaConf

    return OmegaConf.merge(OmegaConf.structured(JobConfig), values)
