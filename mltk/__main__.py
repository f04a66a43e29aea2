"""``python -m mltk`` (and ``torchrun -m mltk``) runs the CLI."""

from mltk.cli import main

if __name__ == "__main__":
    main()
