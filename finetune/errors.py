"""The exceptions that reach a CLI user as one line instead of a traceback: bad input (exit 2), and a
run stopped by a signal after saving its checkpoint (exit 128 + the signal)."""

from __future__ import annotations

import signal


class UserError(Exception):
    """Bad input from the user: the message says what is wrong, where, and how to fix it.

    The CLI prints it as one line on stderr and exits with status 2.
    """


class Interrupted(Exception):
    """SIGINT/SIGTERM arrived during training; a checkpoint was saved at a step boundary (in `where`)."""

    def __init__(self, signum: int, step: int, where: str) -> None:
        super().__init__(
            f"{signal.Signals(signum).name} at step {step}: checkpoint saved in {where}; "
            "continue with the same command plus resume=true"
        )
        self.exit_code = 128 + signum
