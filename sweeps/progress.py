"""Progress of a sweep on the terminal: a tqdm bar of runs, or nothing."""

from __future__ import annotations


class _NoBar:
    def update(self, n):
        pass

    def set_postfix(self, **kw):
        pass

    def close(self):
        pass


def _progress_bar(total: int, enabled: bool, name: str):
    if not enabled or total == 0:
        return _NoBar()
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="run", desc=name, smoothing=0.1, dynamic_ncols=True)
