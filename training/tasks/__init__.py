"""The task registry: every adapter the project trains, by name."""

from __future__ import annotations

from training.tasks import email, json_extract, pirate, sentiment
from training.tasks.base import Example, Task

TASKS: dict[str, Task] = {t.name: t for t in (json_extract.TASK, pirate.TASK, email.TASK, sentiment.TASK)}

__all__ = ["TASKS", "Example", "Task", "get_task"]


def get_task(name: str) -> Task:
    """The task called `name`; a `KeyError` lists the known ones."""
    if name not in TASKS:
        raise KeyError(f"unknown task {name!r}; known: {', '.join(TASKS)}")
    return TASKS[name]
