"""Embedded tasks whose quality is computed by a program (a gold reward)."""
from .letters import TASKS, LettersTask, get_task

__all__ = ["TASKS", "LettersTask", "get_task"]
