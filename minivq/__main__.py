"""``python -m minivq`` and the ``minivq`` command (setup.cfg's entry point): ``minivq.cli.main``.

Importing the CLI (NumPy, every module of minivq) takes a moment; a Ctrl-C then is
reported like any other, as one line ``minivq <command>: interrupted`` and exit 130.
(The package's own ``__init__`` runs before this module: a Ctrl-C during it still
ends with Python's traceback.)
"""
import sys


def entry():
    try:
        from .cli import main
    except KeyboardInterrupt:
        command = next((a for a in sys.argv[1:] if not a.startswith("-")), None)
        print(f"minivq{' ' + command if command else ''}: interrupted", file=sys.stderr, flush=True)
        return 130
    return main()


if __name__ == "__main__":
    sys.exit(entry())
