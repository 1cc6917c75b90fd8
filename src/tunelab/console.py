"""One rich console for progress and messages (stderr, so stdout stays clean for results)."""

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

console = Console(stderr=True)


def progress_bar(label: str) -> Progress:
    """A labelled bar with a count and the time left (eval, merging)."""
    return Progress(TextColumn(f"[bold]{label}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(), console=console)
