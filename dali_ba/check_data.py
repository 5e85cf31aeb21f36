"""``python -m dali_ba.check_data``, the name before ``dali-ba check-data`` (:mod:`dali_ba.tools.check_data`): kept working."""
if __name__ == "__main__":
    from dali_ba.__main__ import run

    run("check-data")
