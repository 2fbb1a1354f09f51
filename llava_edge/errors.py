"""Errors that mean "the user's input is wrong": the CLI prints their message on one line and exits 2."""


class UserError(Exception):
    """Bad input (file, checkpoint, bundle, prompt). The message names the problem in one line."""


class ImageError(UserError):
    """An image that cannot be read or is not supported."""


class CheckpointError(UserError):
    """A checkpoint that cannot be found, recognised or loaded."""
