"""``python -m dali_ba.plot``, the name before ``dali-ba plot`` (:mod:`dali_ba.tools.plot`): kept working."""
if __name__ == "__main__":
    from dali_ba.__main__ import run

    run("plot")
