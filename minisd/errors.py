"""The one exception type for bad input: scripts print its message as a single line and exit 2."""


class MinisdError(Exception):
    """A problem with the user's input (path, flag, checkpoint, image, adapter), stated in one line."""
