"""``python -m dali_ba.data.shards``, the shard writer's command from before it became
:mod:`dali_ba.data.shard_writer` (also ``dali-ba shards``): kept working, as docs/data.md names it."""
if __name__ == "__main__":
    import sys

    from dali_ba.data.shard_writer import main

    sys.exit(main())
