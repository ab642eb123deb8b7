"""Progress bars that cost nothing when off: tqdm is imported only when a bar is shown (a bare GPU worker may lack it)."""

from __future__ import annotations

from typing import Iterable, TypeVar

T = TypeVar("T")


class _Silent:
    """What a disabled bar needs to answer: updates, a postfix and close, all ignored."""

    def update(self, n: int = 1) -> None:
        pass

    def set_postfix_str(self, text: str) -> None:
        pass

    def close(self) -> None:
        pass


def bar(*, enabled: bool = True, **options):
    """A tqdm bar with ``options`` when ``enabled``, else one that does nothing."""
    if not enabled:
        return _Silent()
    from tqdm import tqdm

    return tqdm(**options)


def iterate(items: Iterable[T], *, enabled: bool = True, **options) -> Iterable[T]:
    """``items``, shown with a tqdm bar when ``enabled``."""
    if not enabled:
        return items
    from tqdm import tqdm

    return tqdm(items, **options)
