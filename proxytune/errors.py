"""The one exception type users need to catch."""


class ProxyTuneError(ValueError):
    """Bad input or an unusable model combination; the message says what to fix."""


def validation_problem(error) -> str:
    """The first thing a pydantic ValidationError refused, as "field: why, got value" (union branch tags such
    as "int" or "list[str]" left out of the field's path)."""
    problem = error.errors(include_url=False)[0]
    field = ".".join(str(part) for part in problem["loc"]
                     if not str(part).startswith(("str", "int", "list[", "float", "dict[", "bool")))
    return f"{field}: {problem['msg']}, got {problem.get('input')!r}"


class FormatLimit(ProxyTuneError):
    """An output format asked more of the grammar parser mid-generation than its resource limits allow
    (llguidance's bounds per step, e.g. 2,000 Earley items in a row): the request's format is at fault, not a model,
    so a server answers 400 naming response_format."""


class SourceFailure(ProxyTuneError):
    """A model source stopped answering mid-generation (a remote server died, kept refusing, timed
    out). Decoding ends the affected rows with finish_reason "error" and keeps their text so far."""


class RowFailure(SourceFailure):
    """A source answered for some rows of a batch and refused the others (a remote server refusing one
    row's request, e.g. as too long for its context). `rows` are the refused rows' positions in the
    session's batch; the session's state is as it was before the call, so the engine ends those rows
    with the reason and runs the step again without them."""

    def __init__(self, message: str, rows):
        super().__init__(message)
        self.rows = sorted(set(int(r) for r in rows))
