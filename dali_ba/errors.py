"""The one exception type users see: a bad input, reported as a single line."""


class UsageError(Exception):
    """Bad input (flag, recipe, data). Command-line entry points print it as one line and exit 2."""


class UnreadableImageError(UsageError):
    """A data file that cannot be decoded, found by one rank while training, so reported by that rank."""
