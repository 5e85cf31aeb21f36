"""``python -m dali_ba.reproduce``, the name before ``dali-ba reproduce`` (:mod:`dali_ba.tools.reproduce`): kept working."""
if __name__ == "__main__":
    from dali_ba.__main__ import run

    run("reproduce")
