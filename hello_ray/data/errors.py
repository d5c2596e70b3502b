"""Data errors: each names what was wrong and where (file, shard, row, class, folder).

Ray Data sends an exception raised inside a UDF back to the driver as text inside a
``RayTaskError(UserCodeException)``; the original type is lost. :func:`data_errors` turns
such an error back into the DataError it carries, so callers (and tests) can catch
``CorruptImageError`` etc. whether the check ran on the driver or in a Ray task.
"""
from __future__ import annotations

import contextlib
import re
from typing import Iterator


class DataError(ValueError):
    """A dataset is unreadable or inconsistent (bad layout, label out of range, ...)."""


class CorruptImageError(DataError):
    """An image file or record could not be decoded."""

    def __init__(self, where: str, reason: str = "") -> None:
        self.where = where
        self.reason = reason
        super().__init__(f"corrupt image {where}" + (f": {reason}" if reason else "")
                         + " (set data.on_corrupt=skip to skip undecodable images)")


class EmptyClassError(DataError):
    """A class has no images (an empty class folder, or no rows with its label)."""

    def __init__(self, class_name: str, where: str) -> None:
        self.class_name = class_name
        self.where = where
        super().__init__(f"class {class_name!r} has no images in {where}; remove the class or add "
                         "images to it")


class ClassMismatchError(DataError):
    """The train and val splits do not have the same ordered class list."""

    def __init__(self, train: list[str], val: list[str], where: str = "") -> None:
        only_train = sorted(set(train) - set(val))
        only_val = sorted(set(val) - set(train))
        parts = []
        if only_train:
            parts.append(f"only in train: {_short(only_train)}")
        if only_val:
            parts.append(f"only in val: {_short(only_val)}")
        if not parts:
            first = next(i for i, (a, b) in enumerate(zip(train, val)) if a != b)
            parts.append(f"same classes in a different order (first difference at index {first}: "
                         f"train {train[first]!r} vs val {val[first]!r})")
        self.only_train, self.only_val = only_train, only_val
        super().__init__(f"train and val classes differ{(' in ' + where) if where else ''}: "
                         + "; ".join(parts))


def _short(names: list[str], n: int = 10) -> str:
    more = f" ... (+{len(names) - n} more)" if len(names) > n else ""
    return ", ".join(repr(x) for x in names[:n]) + more


_ERRORS = {c.__name__: c for c in (DataError, CorruptImageError, EmptyClassError, ClassMismatchError)}
# The last "<ErrorName>: message" line of a remote traceback (messages are one line).
_REMOTE = re.compile(r"(?:^|[\s.])(" + "|".join(_ERRORS) + r"): (.+)$", re.MULTILINE)


def exception_chain(exc: BaseException) -> Iterator[BaseException]:
    """``exc`` and everything it wraps, depth first, each once: Ray Train's user-exception wrapper
    (``_base_exc``), then the explicit cause, a Ray error's ``cause``, the context."""
    seen: set[int] = set()
    todo: list[BaseException | None] = [exc]
    while todo:
        cur = todo.pop()
        if cur is None or id(cur) in seen:
            continue
        seen.add(id(cur))
        yield cur
        todo += reversed([getattr(cur, "_base_exc", None), cur.__cause__, getattr(cur, "cause", None),
                          cur.__context__])


def find_data_error(exc: BaseException) -> DataError | None:
    """The DataError that ``exc`` is or carries (also as text from a Ray task), else None."""
    for cur in exception_chain(exc):
        if isinstance(cur, DataError):
            return cur
    matches = _REMOTE.findall(str(exc))
    if not matches:
        return None
    name, message = matches[-1]
    err = DataError.__new__(_ERRORS[name])
    DataError.__init__(err, message.strip())  # attributes of the remote instance are not recoverable
    return err


@contextlib.contextmanager
def data_errors() -> Iterator[None]:
    """Re-raise a DataError that comes back from Ray Data wrapped in a task error as itself."""
    try:
        yield
    except DataError:
        raise
    except Exception as e:  # noqa: BLE001 - only re-typed when it carries a DataError
        err = find_data_error(e)
        if err is None:
            raise
        raise err from e
