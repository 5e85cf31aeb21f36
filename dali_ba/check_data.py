"""``python -m dali_ba.check_data``, deprecated: the name before ``dali-ba check-data``.

Kept for one release (CHANGELOG.md, Deprecated): a note on stderr, then ``dali-ba check-data``
(:mod:`dali_ba.tools.check_data`) with the same arguments and exit status. Then this module goes, with its
entry in tests/test_deprecated_names.py and the top layer in setup.cfg's import contract.
"""

if __name__ == "__main__":
    from dali_ba.__main__ import run_deprecated

    run_deprecated("dali_ba.check_data", "check-data")
