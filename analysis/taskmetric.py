"""A run's metric as its task names it (hil/tasks.py Task.describe, the run log's task_metric_json attribute):
classification's test accuracy, the LSTM's bits per character, ... A log from before tasks classifies."""

from __future__ import annotations

import json
from typing import Any

#: The metric of a classifier, and of every run logged before tasks existed.
CLASSIFY: dict[str, Any] = {"task": "classify", "name": "test_accuracy", "label": "test accuracy",
                            "higher_is_better": True, "train": "train_accuracy", "running": "running_accuracy",
                            "running_title": "running accuracy", "short": "test"}


def task_metric(attrs: dict[str, Any]) -> dict[str, Any]:
    """The metric's names (name, label, higher_is_better, train, running, running_title, short) of a run log's
    attributes."""
    raw = attrs.get("task_metric_json")
    if raw is None:
        return dict(CLASSIFY)
    try:
        got = json.loads(raw.decode() if isinstance(raw, bytes) else str(raw))
    except ValueError:
        return dict(CLASSIFY)
    return {**CLASSIFY, **got} if isinstance(got, dict) else dict(CLASSIFY)
