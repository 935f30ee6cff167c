"""Errors a user can cause and fix; the CLI prints them as one line and exits with code 2."""


class QRobustError(ValueError):
    """Base class for errors caused by user input (arguments, files, data).

    It is a ``ValueError`` so that code catching the standard exception for bad values catches it too.
    """


class DatasetNotFoundError(QRobustError, FileNotFoundError):
    """The files of a dataset are not where we looked; the message names them and where to put them."""


class CheckpointError(QRobustError):
    """A checkpoint is missing, truncated, corrupt, or not written by qrobust."""


class UnsupportedModelError(QRobustError):
    """A model uses an operation (or a setting of one) that the requested technique cannot run."""
