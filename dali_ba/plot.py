"""``python -m dali_ba.plot``, deprecated: the name before ``dali-ba plot``.

Kept for one release (CHANGELOG.md, Deprecated): a note on stderr, then ``dali-ba plot``
(:mod:`dali_ba.tools.plot`) with the same arguments and exit status. Then this module goes, with its
entry in tests/test_deprecated_names.py and the top layer in setup.cfg's import contract.
"""

if __name__ == "__main__":
    from dali_ba.__main__ import run_deprecated

    run_deprecated("dali_ba.plot", "plot")
