"""Errors in the page: every handler's error reaches the visitor as one sentence (``gr.Error``), never a traceback;
unexpected errors are logged on the server with theirs."""
from __future__ import annotations

import functools
import inspect
import logging

import gradio as gr

from ..errors import FlowalignError

log = logging.getLogger("flowalign.app")


def one_line(err: BaseException) -> str:
    """The first line of an error's message (the whole message of a user error)."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def page_error(err: BaseException) -> "gr.Error":
    """A user error as it is; anything else as a short sentence (its traceback goes to the server log)."""
    from ..rewards import RewardError

    if isinstance(err, gr.Error):
        return err
    if isinstance(err, (FlowalignError, RewardError)):
        return gr.Error(one_line(err), print_exception=False)
    log.error("flowalign app: unexpected error", exc_info=err)
    return gr.Error(f"Something went wrong: {type(err).__name__}: {one_line(err)}", print_exception=False)


def in_page_errors(fn):
    """Wrap a handler (plain or generator) so any error reaches the page as ``gr.Error`` with one sentence."""
    if inspect.isgeneratorfunction(fn):
        @functools.wraps(fn)
        def stream(*args):
            try:
                yield from fn(*args)
            except Exception as err:  # noqa: BLE001 - every error becomes one sentence in the page
                raise page_error(err) from None
        return stream

    @functools.wraps(fn)
    def call(*args):
        try:
            return fn(*args)
        except Exception as err:  # noqa: BLE001
            raise page_error(err) from None
    return call
