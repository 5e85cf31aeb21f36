"""``python -m dali_ba.profile``, the name before ``dali-ba profile`` (:mod:`dali_ba.tools.profile`): kept working."""
if __name__ == "__main__":
    from dali_ba.__main__ import run

    run("profile")
