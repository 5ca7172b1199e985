"""A benchmark's result table, on the console (rich) and as markdown, from the same cells:
numbers right-aligned, the columns named in `left` left-aligned."""

from rich.table import Table


def print_table(console, title: str, header, rows, left=()):
    table = Table(title=title)
    for col in header:
        table.add_column(col, justify="left" if col in left else "right")
    for row in rows:
        table.add_row(*row)
    console.print(table)


def markdown_table(header, rows, left=()) -> list:
    """The table's markdown lines."""
    rule = "|" + "".join("---|" if col in left else "---:|" for col in header)
    return (["| " + " | ".join(header) + " |", rule]
            + ["| " + " | ".join(row) + " |" for row in rows])
