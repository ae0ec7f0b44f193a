"""The one exception type users need to catch."""


class ProxyTuneError(ValueError):
    """Bad input or an unusable model combination; the message says what to fix."""
