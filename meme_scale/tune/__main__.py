import sys

from .cli import main

if __name__ == "__main__":  # a forkserver imports __main__ again
    sys.exit(main())
