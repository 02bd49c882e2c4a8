"""Train one task adapter on synthetic data: `python -m training.train --task json-extract` (or `--all`).

Seeded and single-threaded, so a rerun reproduces the adapter. The finished adapter is evaluated offline on the
task's held-out prompts and the score is written into its README.
"""

from __future__ import annotations

import argparse
import logging
import random
import shlex
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import PreTrainedTokenizerBase

from training import artifacts
from training.evaluate import HELDOUT_SEED, evaluate_offline
from training.model import IGNORE, collate, generate, load_base, training_ids
from training.tasks import TASKS, Example, Task, get_task

log = logging.getLogger("training.train")
RESTYLE_MAX_TOKENS = 48


def training_examples(task: Task, model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase) -> list[Example]:
    """The task's training set; for restyled tasks the answers wrap the base model's own greedy replies."""
    examples = task.examples("train", task.train.num_examples, task.train.seed)
    if task.restyle is None:
        return examples
    replies = generate(model, tokenizer, [e.prompt for e in examples], RESTYLE_MAX_TOKENS)
    return [Example(e.prompt, task.restyle(reply)) for e, reply in zip(examples, replies, strict=True)]


def batches(rows: Sequence[tuple[list[int], list[int]]], size: int, seed: int) -> Iterator[list]:
    """Endless shuffled batches, a new permutation every epoch."""
    rng = random.Random(seed)
    while True:
        order = list(range(len(rows)))
        rng.shuffle(order)
        for start in range(0, len(order) - size + 1, size):
            yield [rows[i] for i in order[start : start + size]]


def answer_loss(model: PeftModel, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Cross-entropy on answer tokens only; the LM head runs on those positions alone, not the whole sequence."""
    causal_lm = model.get_base_model()
    hidden = causal_lm.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    labels = batch["labels"][:, 1:]  # [B, T-1]: the token each position predicts
    keep = labels != IGNORE  # [B, T-1]
    logits = causal_lm.lm_head(hidden[:, :-1][keep])  # [N, vocab]
    return F.cross_entropy(logits, labels[keep])


def lora_config(task: Task) -> LoraConfig:
    spec = task.adapter
    return LoraConfig(
        r=spec.rank,
        lora_alpha=spec.alpha,
        target_modules=list(spec.targets),
        use_dora=spec.use_dora,
        use_rslora=spec.use_rslora,
        lora_dropout=0.0,
        bias="none",
        task_type="CAUSAL_LM",
    )


def train(task: Task, steps: int) -> tuple[PeftModel, dict]:
    """Train the task's adapter; returns the PEFT model and the numbers for `training.json`."""
    spec = task.train
    torch.manual_seed(spec.seed)
    base, tokenizer = load_base()
    examples = training_examples(task, base, tokenizer)
    rows = [training_ids(tokenizer, e.prompt, e.answer) for e in examples]
    model = get_peft_model(base, lora_config(task))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=spec.lr, weight_decay=0.0)
    warmup = min(spec.warmup, steps)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min((s + 1) / warmup, (steps - s) / max(steps - warmup, 1))
    )
    started, recent = time.monotonic(), []
    for step, rows_batch in zip(range(steps), batches(rows, spec.batch_size, spec.seed), strict=False):
        loss = answer_loss(model, collate(rows_batch, tokenizer.pad_token_id))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        recent = [*recent[-9:], loss.item()]
        if step % 10 == 0 or step == steps - 1:
            log.info("%s step %d/%d loss %.4f (%.0f s)", task.name, step + 1, steps, loss.item(),
                     time.monotonic() - started)  # fmt: skip
    stats = {
        "steps": steps, "lr": spec.lr, "batch_size": spec.batch_size, "seed": spec.seed,
        "num_examples": len(examples), "final_loss": sum(recent) / len(recent),
        "seconds": time.monotonic() - started, "example": {"prompt": examples[0].prompt, "answer": examples[0].answer},
    }  # fmt: skip
    return model.eval(), stats


def run(task: Task, store: Path, steps: int | None, evaluate: bool) -> None:
    """Train, save, evaluate offline and document one adapter."""
    command = [".venv/bin/python", "-m", "training.train", "--task", task.name]
    command += ["--steps", str(steps)] if steps else []
    model, stats = train(task, steps or task.train.steps)
    folder = artifacts.save_adapter(model, store, task.name)
    artifacts.write_record(folder, {"command": shlex.join(command), "train": stats})
    if evaluate:
        scores = evaluate_offline([task], store, HELDOUT_SEED)[task.name]
        artifacts.record_scores(folder, "offline", scores, ".venv/bin/python -m training.evaluate --offline")
        log.info("%s held-out: adapter %d/%d, base %d/%d", task.name, scores["adapter"], scores["total"],
                 scores["base"], scores["total"])  # fmt: skip
    artifacts.write_readme(task, folder)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--task", choices=sorted(TASKS), help="task to train")
    which.add_argument("--all", action="store_true", help="train every task in turn")
    parser.add_argument("--store", type=Path, default=Path("adapters_store"), help="adapter store directory")
    parser.add_argument("--steps", type=int, default=None, help="override the task's number of steps")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (keep a core free on shared machines)")
    parser.add_argument("--no-eval", action="store_true", help="skip the offline held-out evaluation")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)
    for name in sorted(TASKS) if args.all else [args.task]:
        run(get_task(name), args.store, args.steps, not args.no_eval)


if __name__ == "__main__":
    main()
