"""What lands in `adapters_store/<name>/`: the PEFT adapter in float16, `training.json` and a README."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel
from safetensors.torch import load_file, save_file

from training.model import HUB_NAME
from training.tasks import Task

CONFIG_FILE, WEIGHTS_FILE, RECORD_FILE = "adapter_config.json", "adapter_model.safetensors", "training.json"


def save_adapter(model: PeftModel, store: Path, name: str) -> Path:
    """Write the adapter to `store/name` atomically: a temp folder, fsynced, renamed over any previous one."""
    store.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=store))
    tmp.chmod(0o755)
    try:
        model.save_pretrained(tmp)
        weights = {k: v.to(torch.float16).contiguous() for k, v in load_file(tmp / WEIGHTS_FILE).items()}
        save_file(weights, tmp / WEIGHTS_FILE, metadata={"format": "pt"})
        config = json.loads((tmp / CONFIG_FILE).read_text())
        config["base_model_name_or_path"] = HUB_NAME
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        (tmp / "README.md").unlink(missing_ok=True)  # PEFT's model-card stub; ours is written by `write_readme`
        for path in tmp.iterdir():
            path.chmod(0o644)
            with path.open("rb") as f:
                os.fsync(f.fileno())
        target = store / name
        if target.exists():
            old = target.rename(store / f".{name}-old-{os.getpid()}")
            shutil.rmtree(old)
        tmp.rename(target)
        return target
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def read_record(folder: Path) -> dict[str, Any]:
    path = folder / RECORD_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


def write_record(folder: Path, record: dict[str, Any]) -> None:
    (folder / RECORD_FILE).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")


def record_scores(folder: Path, mode: str, scores: dict[str, Any], command: str) -> None:
    """Store one evaluation (`offline` or `http`) in `training.json` and refresh the README."""
    record = read_record(folder)
    record.setdefault("eval", {})[mode] = {**scores, "command": command}
    write_record(folder, record)


def write_readme(task: Task, folder: Path) -> None:
    """The adapter's README, from the task definition and what `training.json` holds."""
    record, spec = read_record(folder), task.adapter
    size_kb = (folder / WEIGHTS_FILE).stat().st_size / 1024
    kind = "DoRA" if spec.use_dora else "LoRA"
    lines = [
        f"# {task.name}",
        "",
        task.summary,
        "",
        f"{kind} adapter for `{HUB_NAME}` trained by loraplex on synthetic data (PEFT layout, float16 weights, "
        f"{size_kb:.0f} KiB).",
        "",
        "| rank | alpha | targets | DoRA | rsLoRA |",
        "|---|---|---|---|---|",
        f"| {spec.rank} | {spec.alpha} | {', '.join(spec.targets)} | {spec.use_dora} | {spec.use_rslora} |",
        "",
        "## Data",
        "",
        task.data,
        "",
        "## Training",
        "",
        f"    {record.get('command', f'.venv/bin/python -m training.train --task {task.name}')}",
        "",
    ]
    if "train" in record:
        t = record["train"]
        lines += [
            f"{t['steps']} steps of AdamW (lr {t['lr']}, batch {t['batch_size']}, seed {t['seed']}) on "
            f"{t['num_examples']} examples, loss on the answer tokens only; final loss {t['final_loss']:.4f}, "
            f"{t['seconds']:.0f} s on one CPU thread.",
            "",
        ]
    lines += ["## Evaluation", "", "Held-out prompts (templates and entities never seen in training), greedy.", ""]
    lines += _eval_lines(record.get("eval", {}))
    (folder / "README.md").write_text("\n".join(lines).rstrip() + "\n")


def _eval_lines(evals: dict[str, Any]) -> list[str]:
    if not evals:
        return ["Not evaluated yet: `.venv/bin/python -m training.evaluate --offline`."]
    lines = ["| mode | adapter | base model | command |", "|---|---|---|---|"]
    for mode, s in sorted(evals.items()):
        lines.append(
            f"| {mode} | {s['adapter']}/{s['total']} ({100 * s['adapter'] / s['total']:.0f} %) "
            f"| {s['base']}/{s['total']} ({100 * s['base'] / s['total']:.0f} %) | `{s['command']}` |"
        )
    return lines
