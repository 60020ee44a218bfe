"""Console tables: rich when installed, plain aligned text otherwise."""

from __future__ import annotations


def print_table(title: str, columns: list[str], rows: list[list[str]], *, left: int = 1) -> None:
    """Print ``rows`` under ``columns``; the first ``left`` columns are left-aligned."""
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        widths = [
            max(len(c), *(len(r[i]) for r in rows)) if rows else len(c)
            for i, c in enumerate(columns)
        ]

        def line(cells):
            return "  ".join(
                c.ljust(w) if i < left else c.rjust(w)
                for i, (c, w) in enumerate(zip(cells, widths))
            )

        print(title)
        print(line(columns))
        print("  ".join("-" * w for w in widths))
        for r in rows:
            print(line(r))
        return
    t = Table(title=title)
    for i, c in enumerate(columns):
        t.add_column(c, justify="left" if i < left else "right")
    for r in rows:
        t.add_row(*r)
    Console().print(t)
