"""Errors that are the user's to fix: the CLI prints them as one line and exits with code 2."""


class InputError(Exception):
    """Bad input (a file, a folder, a configuration); the message names what and where."""
