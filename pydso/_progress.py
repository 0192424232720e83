"""Progress bars for long work: tqdm, shown only on an interactive terminal unless asked for."""

import sys

from tqdm.auto import tqdm


def progress_bar(iterable=None, *, total=None, desc=None, enable: bool | None = None, **kwargs):
    """A tqdm bar; ``enable=None`` shows it only when stderr is a TTY (quiet in CI, logs and pipes)."""
    if enable is None:
        enable = sys.stderr.isatty()
    return tqdm(iterable, total=total, desc=desc, disable=not enable, dynamic_ncols=True, **kwargs)
