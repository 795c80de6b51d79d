"""Progress bars on stderr: tqdm's when tqdm is installed and stderr is a terminal, otherwise none."""
import sys


class _Silent:
    def update(self, count=1):
        pass

    def write(self, line, file=None):
        print(line, file=file or sys.stderr)

    def close(self):
        pass


def progress_bar(total, label, enabled=True):
    """A bar with ``update(count)`` and ``close()``.

    Parameters
    ----------
    total : int
        Steps to completion.
    label : str
        Shown before the bar.
    enabled : bool
        False gives a bar that shows nothing.

    Returns
    -------
    tqdm.tqdm or a silent stand-in
        tqdm (``pip install tqdm``; the ``images``, ``dask`` and ``bench`` extras bring it) when it is
        installed and stderr is a terminal; otherwise an object whose ``update`` and ``close`` do nothing.
        ``write(line, file=None)`` prints a line (on stderr by default) without breaking the bar.
    """
    if enabled and sys.stderr.isatty():
        try:
            from tqdm import tqdm
        except ImportError:
            return _Silent()
        return tqdm(total=total, desc=label, file=sys.stderr, leave=False, dynamic_ncols=True)
    return _Silent()
