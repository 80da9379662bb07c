"""Script entry for ``accelerate launch finetune/finetune.py ...`` (same as the ``finetune`` command)."""

from selfsup.finetune.cli import main

if __name__ == "__main__":
    main()
