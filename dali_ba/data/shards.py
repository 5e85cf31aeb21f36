"""``python -m dali_ba.data.shards``, the shard writer's name before ``dali-ba shards``
(:mod:`dali_ba.data.shard_writer`): kept working for the job files that call it."""

if __name__ == "__main__":
    import sys

    from dali_ba.data.shard_writer import main

    sys.exit(main())
