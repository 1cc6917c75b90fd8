"""One rich console for progress and messages (stderr, so stdout stays clean for results)."""

from rich.console import Console

console = Console(stderr=True)
