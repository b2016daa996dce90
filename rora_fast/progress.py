"""Progress bars that stay readable in a log file.

tqdm redraws a bar every 0.1 s; written to a file or a pipe (a CI log, ``demo > log``) that is
one line per redraw. :func:`progress_bar` makes a tqdm bar that, when its stream is not a
terminal, is redrawn at most once a minute (and at its end). Explicit ``mininterval`` wins.
"""
from __future__ import annotations

import sys

__all__ = ["progress_bar", "REDIRECTED_MININTERVAL"]

#: seconds between redraws when the bar's stream is not a terminal
REDIRECTED_MININTERVAL = 60.0


def progress_bar(iterable=None, **kwargs):
    """``tqdm(iterable, **kwargs)``, quiet when its stream (``file``, default stderr) is not
    a terminal."""
    from tqdm.auto import tqdm
    stream = kwargs.get("file") or sys.stderr
    if "mininterval" not in kwargs and not getattr(stream, "isatty", lambda: False)():
        kwargs["mininterval"] = REDIRECTED_MININTERVAL
    return tqdm(iterable, **kwargs)
