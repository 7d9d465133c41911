"""Exceptions with one-line messages meant for users (the CLI prints them and exits 2)."""


class FVSanityError(Exception):
    """Base class: a user-facing error whose message is one line naming the bad value."""


class UnknownModelError(FVSanityError, KeyError):
    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0])


class MissingWeightsError(FVSanityError, FileNotFoundError):
    pass


class UnitError(FVSanityError, ValueError):
    pass


class DataError(FVSanityError, ValueError):
    pass
