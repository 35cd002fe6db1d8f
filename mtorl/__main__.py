"""``python -m mtorl``: the ``mtorl`` console script."""

if __name__ == "__main__":
    from mtorl.cli import main

    raise SystemExit(main())
