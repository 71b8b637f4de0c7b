"""The exceptions printed as a single line, never as a traceback: user mistakes, and faults a run stops on."""

import argparse
import difflib


class UserError(Exception):
    """Bad input from the user (flag, file, record, checkpoint). The message names the problem and where."""


class TrainingFault(Exception):
    """A fault of the run itself (repeated non-finite steps, a checkpoint that cannot be written), raised on every
    rank at once. The message says what is kept (the last good checkpoint) and how to continue."""


def unknown_key_message(key: str, known: list[str], kind: str = "key") -> str:
    """"unknown key 'X'" (or another `kind` of name) plus the nearest valid one, when one is close."""
    near = difflib.get_close_matches(key, known, n=1)
    return f"unknown {kind} '{key}'" + (f" (did you mean '{near[0]}'?)" if near else "")


class OneLineParser(argparse.ArgumentParser):
    """An argument parser whose errors are UserErrors: one line, no usage dump."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UserError(message)
