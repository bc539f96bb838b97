"""The one exception type for mistakes a user can make (bad path, bad key, malformed row).

The command line prints its message as a single line and exits non-zero; anything else that
escapes is a bug in jaxrm and keeps its traceback.
"""


class UserError(Exception):
    """A problem with the user's input, reported as one line without a traceback."""


def causes(error: BaseException) -> list[BaseException]:
    """`error` and what it was raised from or while handling, outermost first."""
    chain = [error]
    while chain[-1].__cause__ or chain[-1].__context__:
        chain.append(chain[-1].__cause__ or chain[-1].__context__)
    return chain


def innermost(error: BaseException) -> BaseException:
    """The first cause of `error`: for a library's wrapped error, the file-level reason."""
    return causes(error)[-1]
