"""Errors a user can cause. The CLI turns them into one-line messages and a non-zero exit."""


class AstridError(Exception):
    """A problem with the user's input (file, config, data) described in one line.

    The message should name the file or setting at fault and what is wrong with it.
    """


class InputFileError(AstridError):
    """A file is missing, unreadable, corrupt or lacks something we need (WCS, image HDU)."""

    def __init__(self, path, problem: str):
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{path}: {problem}")


class ConfigError(AstridError):
    """A configuration file or value is invalid."""
