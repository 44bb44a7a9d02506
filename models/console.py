"""The `mirrorcircuits` command: the project's command lines behind one console script.

    mirrorcircuits compare ...        python -m models.compare ...      (the main job)
    mirrorcircuits reproduce ...      python -m models.reproduce ...    (the authors' MNIST experiment)
    mirrorcircuits imagenet ...       python -m models.imagenet ...     (ImageNet training)
    mirrorcircuits report ...         python -m analysis report ...     (figures and summary of recordings)

`pip install .` puts the script beside the packages (pyproject.toml's [project.scripts]). It works from any
folder: a console script imports the installed packages, so a user's own models.py or analysis.py in the current
folder shadows nothing, whereas `python -m models.compare` run in that folder would import the user's file.
"""
from __future__ import annotations

import importlib
import sys
from typing import Callable, Sequence

PROG = "mirrorcircuits"
COMMANDS: dict[str, tuple[str, str, str]] = {
    "compare": ("models.compare", "main", "every feedback rule on the embedded MNIST subset, recorded, with report"),
    "reproduce": ("models.reproduce", "main", "the authors' MNIST experiment on full MNIST or Fashion-MNIST"),
    "imagenet": ("models.imagenet", "command", "ResNet circuits on ImageNet (one GPU, or several under torchrun)"),
    "report": ("analysis.__main__", "main", "figures (PNG) and summary.md of recordings"),
}
"""Per command: the module, its function taking (argv, prog) and returning an exit status, and what it does."""


def usage() -> str:
    lines = [f"usage: {PROG} {{{','.join(COMMANDS)}}} ...", "", "commands (each has its own --help):"]
    lines += [f"  {name:<10} {what}" for name, (_, _, what) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command that argv (sys.argv[1:] by default) names with the arguments after it; its exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"{usage()}\n{PROG}: error: unknown command {name!r}", file=sys.stderr)
        return 2
    module, function, _ = COMMANDS[name]
    run: Callable[..., int] = getattr(importlib.import_module(module), function)
    if name == "report":              # analysis's command line has its subcommands: report is one
        return run(["report", *rest], prog=PROG)
    return run(rest, prog=f"{PROG} {name}")


if __name__ == "__main__":
    sys.exit(main())
