"""The one exception type users need to catch."""


class ProxyTuneError(ValueError):
    """Bad input or an unusable model combination; the message says what to fix."""


class SourceFailure(ProxyTuneError):
    """A model source stopped answering mid-generation (a remote server died, kept refusing, timed
    out). Decoding ends the affected rows with finish_reason "error" and keeps their text so far."""
