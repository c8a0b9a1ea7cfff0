"""The one exception type srquant raises for bad input, so the CLI can print it as a single line."""


class SrquantError(Exception):
    """A user-facing error: bad input, a missing asset, a checkpoint that does not fit."""
