"""Bounded retries of transient I/O errors in the Ray Data readers, and named permanent ones.

pyarrow's S3 filesystem already retries each request (``AwsStandardS3RetryStrategy``); what
outlasts that (a server that stops answering for longer than its attempts, a connection cut
mid-stream) reaches the reader as an ``OSError``. Ray Data retries such errors only in its own
file datasources, not in our ``map_batches`` readers, so they retry here: a few more times,
with backoff, resuming where they were (the caller never emits a row twice). The transient
messages are Ray Data's own ``DataContext.retried_io_errors`` plus the few it lacks, so one
setting tunes both. Anything else (no such object, access denied, bad credentials) fails at
once with a :class:`DataError` naming the object.
"""
from __future__ import annotations

import logging
import time
from typing import Callable, Iterator, TypeVar

from hello_ray.data.errors import DataError

T = TypeVar("T")
log = logging.getLogger(__name__)

# AWS SDK (pyarrow) error kinds worth another try, beside Ray Data's list; curl code 28 is a
# timeout, 7 a refused connection, 52/56 a connection closed or reset mid-response.
_MORE_TRANSIENT = ("AWS Error SERVICE_UNAVAILABLE", "AWS Error THROTTLING", "AWS Error SLOW_DOWN",
                   "AWS Error NETWORK_CONNECTION", "AWS Error INTERNAL_FAILURE",
                   "(HTTP status 500)", "(HTTP status 502)", "(HTTP status 503)", "(HTTP status 504)",
                   "curlCode: 28", "curlCode: 7,", "curlCode: 52", "curlCode: 56",
                   "Connection reset by peer", "Broken pipe")
BACKOFF_S = 1.0  # doubled per retry


def transient_markers() -> tuple[str, ...]:
    """Messages of I/O errors worth retrying (Ray Data's ``retried_io_errors`` + ours)."""
    try:
        import ray.data

        theirs = tuple(ray.data.DataContext.get_current().retried_io_errors or ())
    except Exception:  # noqa: BLE001 - without Ray (plain use of a reader) ours suffice
        theirs = ()
    return theirs + _MORE_TRANSIENT


def is_transient(exc: BaseException) -> bool:
    """True for an I/O error that another attempt may cure (timeouts, throttling, resets)."""
    if isinstance(exc, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)):
        return False
    if isinstance(exc, (ConnectionError, TimeoutError)):
        return True
    if not isinstance(exc, OSError):
        return False
    text = str(exc)
    return any(m in text for m in transient_markers())


def named_io_error(exc: OSError, where: str, attempts: int = 1) -> DataError:
    """A DataError saying which object failed and what to check (no pyarrow traceback)."""
    text = " ".join(str(exc).split())
    if isinstance(exc, FileNotFoundError):
        why = "no such file or object (was the dataset moved or deleted while reading?)"
    elif isinstance(exc, PermissionError) or any(
            m in text for m in ("ACCESS_DENIED", "INVALID_ACCESS_KEY_ID", "SIGNATURE_DOES_NOT_MATCH",
                                "EXPIRED_TOKEN", "HTTP status 403")):
        why = ("access refused: check the credentials this Ray node resolves (AWS_ACCESS_KEY_ID / "
               "AWS_PROFILE / instance profile / web identity) and the bucket policy")
    elif is_transient(exc):
        why = (f"the storage did not answer after {attempts} attempts (s3_timeout / s3_max_attempts "
               "set how long to wait)")
    else:
        why = "read failed"
    return DataError(f"{where}: {why}: {text}")


def _give_up_or_wait(e: OSError, where: str, attempt: int, attempts: int, progress: str = "") -> None:
    """Raise the named error when ``e`` is permanent or the attempts are spent; else back off."""
    if not is_transient(e) or attempt == attempts:
        raise named_io_error(e, where, attempt) from None
    delay = BACKOFF_S * 2 ** (attempt - 1)
    log.warning("%s: transient I/O error%s (attempt %d/%d), retrying in %.0f s: %s", where, progress,
                attempt, attempts, delay, " ".join(str(e).split())[:200])
    time.sleep(delay)


def retry_io(fn: Callable[[], T], where: str, attempts: int) -> T:
    """``fn()``, retried up to ``attempts`` times in all on a transient I/O error (backoff 1, 2,
    4 s...); a permanent one, or the last transient one, becomes a DataError naming ``where``."""
    for attempt in range(1, attempts + 1):
        try:
            return fn()
        except OSError as e:
            _give_up_or_wait(e, where, attempt, attempts)
    raise AssertionError("unreachable")


def retry_iter(make: Callable[[], Iterator[T]], where: str, attempts: int) -> Iterator[T]:
    """The items of ``make()``; after a transient I/O error, ``make()`` again, skipping the items
    already yielded (a stream that cannot seek is re-read from its start, never re-emitted)."""
    done = 0
    for attempt in range(1, attempts + 1):
        try:
            for i, item in enumerate(make()):
                if i >= done:
                    done += 1
                    yield item
            return
        except OSError as e:
            _give_up_or_wait(e, where, attempt, attempts, f" after {done} items")
