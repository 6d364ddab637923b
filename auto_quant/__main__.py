"""``python -m auto_quant``: the ``auto-round`` command."""

from auto_quant.cli.main import main_default

if __name__ == "__main__":
    raise SystemExit(main_default())
