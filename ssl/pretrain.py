"""Script entry for ``accelerate launch ssl/pretrain.py --config ...`` (same as the ``pretrain`` command)."""

from selfsup.ssl.cli import main

if __name__ == "__main__":
    main()
