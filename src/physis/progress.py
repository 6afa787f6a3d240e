"""Progress bars with an ETA for long work (collection, evaluation, training)."""

from __future__ import annotations

from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)


def progress_bar(verb: str, field: str, enabled: bool = True) -> Progress:
    """A bar labelled `verb <description>` that also shows `{field}: <task.fields[field]>`."""
    return Progress(TextColumn(f"[bold]{verb}[/] {{task.description}}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn(f"{field} {{task.fields[{field}]}}"), TimeElapsedColumn(), TextColumn("eta"),
                    TimeRemainingColumn(), disable=not enabled)
