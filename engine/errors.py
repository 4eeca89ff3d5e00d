"""The one error type a user can cause: bad DSL, bad image or intrinsics, wrong weights, bad settings.

Every raise names the offending value and what would have been accepted. Internal invariants use
`assert`/`RuntimeError`; anything a person or a file on disk can get wrong raises `InputError`.
"""


class InputError(ValueError):
    """A value supplied by a user (argument, file, message) is not acceptable.

    The message always contains the offending value and what is accepted instead.
    """
