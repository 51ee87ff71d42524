"""``PicklableBeforeUse``: objects Lightning may pickle (``ddp_spawn``) before they start threads or processes."""

from __future__ import annotations

from typing import Any, Callable, ClassVar


class PicklableBeforeUse:
    """Pickles while unused; locks and counters named in ``_RECREATED`` are rebuilt fresh on unpickling.

    Subclasses set ``_RECREATED`` (attribute -> factory) and ``_in_use()`` (a reason string once pickling would
    copy live threads, processes or buffers, else None).
    """

    _RECREATED: ClassVar[dict[str, Callable[[], Any]]] = {}

    def _in_use(self) -> str | None:
        return None

    def __getstate__(self) -> dict:
        reason = self._in_use()
        if reason is not None:
            raise TypeError(f"{type(self).__name__} cannot be pickled: {reason}; pickle it before its first use")
        return {k: v for k, v in self.__dict__.items() if k not in self._RECREATED}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        for name, factory in self._RECREATED.items():
            setattr(self, name, factory())
