"""Run the README's offline quick start as written, shortened: what CI runs on the real
SmolLM2 so that a quick start failing on another machine fails CI first.

The commands are read from the README (the first ```bash block after the line
`<!-- quickstart -->`), so CI follows every change to them. Only the amount of work is cut,
by replacing exact strings that must be there (`--steps 5` -> `--steps 2`, ...): if the
README stops saying them, this fails and asks to be updated rather than running the long
version or nothing.

    python scripts/readme_quickstart.py            # from the repository's root
    python scripts/readme_quickstart.py --print    # the commands only
"""

import argparse
import subprocess
import sys
from pathlib import Path

MARKER = "<!-- quickstart -->"
SHORTER = {"--steps 5": "--steps 2", "--limit 50": "--limit 5"}


def quickstart_commands(readme: str) -> str:
    after = readme.split(MARKER, 1)
    if len(after) != 2:
        sys.exit(f"error: README.md has no {MARKER!r} line before its quick start")
    block = after[1].split("```bash\n", 1)[1].split("```", 1)[0]
    for long, short in SHORTER.items():
        if long not in block:
            sys.exit(f"error: the quick start no longer says {long!r}; update SHORTER in "
                     f"{Path(__file__).name}")
        block = block.replace(long, short)
    return block


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--print", action="store_true", help="print the commands, run nothing")
    args = parser.parse_args()
    commands = quickstart_commands(Path("README.md").read_text())
    if args.print:
        print(commands, end="")
        return
    done = subprocess.run(["bash", "-euxo", "pipefail", "-c", commands])
    sys.exit(done.returncode)


if __name__ == "__main__":
    main()
