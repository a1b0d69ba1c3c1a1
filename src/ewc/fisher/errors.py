"""The one exception type of :mod:`ewc.fisher`."""


class FisherError(ValueError):
    """A bad argument or a degenerate result in Fisher estimation.

    A :class:`ValueError`, so ``except ValueError`` catches it too. Every message names the bad
    value and says how to fix it.
    """
