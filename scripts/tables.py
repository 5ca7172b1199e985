"""A benchmark's result table on the console (rich), every column right-aligned."""

from rich.table import Table


def print_table(console, title: str, header, rows):
    table = Table(title=title)
    for col in header:
        table.add_column(col, justify="right")
    for row in rows:
        table.add_row(*row)
    console.print(table)
