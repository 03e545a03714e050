"""GRPO with TRL on a Hugging Face model directory, on CPU: the RL stage in miniature.

::

    python examples/rl/grpo_trl.py --model HF_DIR --output-dir OUT [--steps 8]
    python examples/rl/grpo_trl.py --model HF_DIR --output-dir OUT \\
        --data math.parquet --prompt-field problem --answer-field answer

``HF_DIR`` is any causal LM with its tokenizer, e.g. a GIFT run exported with
``python -m megatron_gift.convert megatron-to-hf``. The default data is the bundled arithmetic
task (``megatron_gift.demo.synthetic``); ``--data`` takes a parquet or JSONL file of math problems.

Reward (verifiable, per completion): 1.0 when the final answer it states equals the reference,
else 0.0 -- the text after the last ``A:`` for the arithmetic task, ``math_verify`` equivalence
for ``--data``. Prompts get the tokenizer's chat template when it has one, else are plain text,
which TRL encodes with the tokenizer's special tokens: bos first where the tokenizer adds one
(Llama's and the bundled tokenizer do), as the trainer starts a template-less record.
The mean reward of each step is printed; the model is saved under ``--output-dir``.
"""

import argparse
import os
import random
import sys

from datasets import Dataset, load_dataset
from transformers import AutoTokenizer, TrainerCallback
from trl import GRPOConfig, GRPOTrainer

from megatron_gift.demo import synthetic


def synthetic_dataset(num_prompts, seed):
    """``num_prompts`` arithmetic problems as ``{"prompt", "answer"}`` rows."""
    rng = random.Random(seed)
    rows = []
    for _ in range(num_prompts):
        prompt, responses = synthetic.problem(rng)
        rows.append({"prompt": prompt, "answer": synthetic.answer_of(responses["stepwise"])})
    return Dataset.from_list(rows)


def file_dataset(path, prompt_field, answer_field):
    """A parquet/JSONL file's ``prompt_field`` and ``answer_field`` as ``{"prompt", "answer"}``."""
    kinds = {".parquet": "parquet", ".jsonl": "json", ".json": "json"}
    kind = kinds.get(os.path.splitext(path)[1])
    if kind is None or not os.path.isfile(path):
        raise ValueError(f"--data {path}: expected an existing .parquet or .jsonl file")
    data = load_dataset(kind, data_files=path, split="train")
    missing = [f for f in (prompt_field, answer_field) if f not in data.column_names]
    if missing:
        raise ValueError(f"--data {path}: no field {missing} (fields: {data.column_names})")
    return data.map(lambda row: {"prompt": row[prompt_field], "answer": str(row[answer_field])},
                    remove_columns=data.column_names)


def as_chat(data, tokenizer):
    """``data`` with prompts as one user message when ``tokenizer`` has a chat template."""
    if tokenizer.chat_template is None:
        return data
    return data.map(lambda row: {"prompt": [{"role": "user", "content": row["prompt"]}]})


def completion_text(completion):
    """The generated text of a TRL completion (plain string or assistant message list)."""
    return completion if isinstance(completion, str) else completion[-1]["content"]


def arithmetic_reward(completions, answer, **_):
    """1.0 where the completion's stated answer (after its last ``A:``) equals ``answer``."""
    return [float(synthetic.answer_of(completion_text(c)) == a) for c, a in zip(completions, answer)]


def math_reward(completions, answer, **_):
    """1.0 where ``math_verify`` finds the completion's answer equivalent to ``answer``."""
    from math_verify import parse, verify

    return [float(verify(parse(a), parse(completion_text(c)))) for c, a in zip(completions, answer)]


class PrintReward(TrainerCallback):
    """Prints the mean reward and the step time (s) TRL logs after every step."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "reward" in logs:
            print(f"step {state.global_step}: mean reward {logs['reward']:.3f}, "
                  f"step time {logs.get('step_time', float('nan')):.2f} s", flush=True)


def build_trainer(model, data, reward, output_dir, steps, prompts_per_step=2, generations=4,
                  max_completion_length=24, learning_rate=1e-5, seed=0):
    """A CPU ``GRPOTrainer``: ``prompts_per_step`` prompts x ``generations`` samples per step."""
    tokenizer = AutoTokenizer.from_pretrained(model)
    config = GRPOConfig(
        output_dir=output_dir, max_steps=steps, learning_rate=learning_rate, seed=seed,
        per_device_train_batch_size=prompts_per_step * generations, num_generations=generations,
        max_completion_length=max_completion_length, temperature=1.0, use_cpu=True, bf16=False,
        logging_steps=1, save_strategy="no", report_to="none")
    return GRPOTrainer(model=model, reward_funcs=reward, args=config, processing_class=tokenizer,
                       train_dataset=as_chat(data, tokenizer), callbacks=[PrintReward()])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="Hugging Face model directory")
    parser.add_argument("--output-dir", required=True)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--prompts-per-step", type=int, default=2)
    parser.add_argument("--generations", type=int, default=4, help="samples per prompt (group)")
    parser.add_argument("--max-completion-length", type=int, default=24, help="tokens")
    parser.add_argument("--learning-rate", type=float, default=1e-5)
    parser.add_argument("--data", help="parquet/JSONL math problems (default: arithmetic task)")
    parser.add_argument("--prompt-field", default="problem")
    parser.add_argument("--answer-field", default="answer")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if not os.path.isfile(os.path.join(args.model, "config.json")):
        sys.exit(f"error: --model {args.model}: no config.json (expected a Hugging Face model directory)")
    try:
        data, reward = ((file_dataset(args.data, args.prompt_field, args.answer_field), math_reward)
                        if args.data else
                        (synthetic_dataset(args.steps * args.prompts_per_step, args.seed),
                         arithmetic_reward))
    except ValueError as error:
        sys.exit(f"error: {error}")
    trainer = build_trainer(args.model, data, reward, args.output_dir, args.steps,
                            args.prompts_per_step, args.generations, args.max_completion_length,
                            args.learning_rate, args.seed)
    trainer.train()
    trainer.save_model(args.output_dir)
    print(f"saved {args.output_dir}")


if __name__ == "__main__":
    main()
