"""Script entry for ``accelerate launch compress/compress.py ...`` (same as the ``compress`` command)."""

from selfsup.compress.cli import main

if __name__ == "__main__":
    main()
