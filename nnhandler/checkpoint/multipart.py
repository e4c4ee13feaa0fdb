"""Streaming uploads to S3: a checkpoint's bytes go into a multipart upload as they are written.

:meth:`~.remote.FsspecStore.publish` on an s3fs filesystem hands the checkpoint writer a
:class:`MultipartUpload` instead of a local staging file: the writer's pickling and CRC-32 run
while the parts written so far are uploaded, and no byte touches the local disk.

* Parts of :data:`PART_SIZE` bytes (S3 wants 5 MiB at least for every part but the last; the
  size doubles every 1,000 parts, so the 10,000 parts S3 allows hold more than its 5 TiB
  object limit) are uploaded by up to :data:`IN_FLIGHT` threads while the writer fills the
  next one; a writer that is faster than the store waits for a free buffer, so at most
  ``(IN_FLIGHT + 1) x PART_SIZE`` bytes are held.
* The upload is begun when the first part is full; a checkpoint smaller than one part goes up
  in one PUT when it is complete.
* :meth:`MultipartUpload.complete` runs only after the writer returned, i.e. after the
  integrity record (the file's last bytes) was written: only then does the object become
  visible, whole, under its name, replacing an older one in one step.
* Any error (the writer's, a part's after its retries, the completion's) leads to
  :meth:`MultipartUpload.abort`: the parts are dropped, nothing appears under the name. A
  process killed meanwhile leaves an incomplete upload, invisible to readers and aborted at the
  next start (:func:`~.store_files.abort_stale_uploads`).

Every request (begin, each part, the single PUT, completion, abort) goes through
:meth:`~.remote.FsspecStore.call`: a deadline (for data: grown by its size) and bounded retries
(the abort: one attempt, so that a dead endpoint's failure is not delayed by it). After a
failed part the writer stops at its next write; the abort waits for the parts still running
(each bounded the same way).
"""

from __future__ import annotations

import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, Final

from ..errors import RemoteStorageError

if TYPE_CHECKING:
    from .remote import FsspecStore
    from .storage import URL

__all__ = ["IN_FLIGHT", "PART_SIZE", "MultipartUpload", "part_size", "streams_uploads"]

#: the size of the first 1,000 parts
PART_SIZE: Final = 32 * 2**20
#: parts uploaded at the same time
IN_FLIGHT: Final = 4
#: S3's smallest part (all but the last) and its most parts per upload
MIN_PART_SIZE: Final = 5 * 2**20
MAX_PARTS: Final = 10_000
_PARTS_PER_SIZE: Final = 1_000
_LOGGER: Final = logging.getLogger("nnhandler")


def streams_uploads(fs: Any) -> bool:
    """Whether ``fs`` takes a :class:`MultipartUpload` (s3fs: it has ``call_s3``, the S3 API)."""
    return callable(getattr(fs, "call_s3", None)) and callable(getattr(fs, "split_path", None))


def part_size(number: int, first: int = PART_SIZE) -> int:
    """The size of part ``number`` (1-based): ``first``, doubled every 1,000 parts."""
    return first << ((number - 1) // _PARTS_PER_SIZE)


class MultipartUpload:
    """A write-only binary stream whose bytes become the object ``target`` on
    :meth:`complete`, or nothing on :meth:`abort` (see the module docstring). Use::

        upload = MultipartUpload(store, url)
        try:
            write(upload)
            upload.complete()
        except BaseException:
            upload.abort()
            raise
    """

    def __init__(self, store: FsspecStore, target: URL, first_part: int = PART_SIZE,
                 in_flight: int = IN_FLIGHT) -> None:
        if first_part < MIN_PART_SIZE:
            raise ValueError(f"parts of {first_part} bytes are below S3's minimum of "
                             f"{MIN_PART_SIZE}")
        if in_flight < 1:
            raise ValueError(f"in_flight must be 1 or more, got {in_flight}")
        self._store = store
        self._target = target
        bucket, key, _ = store.fs.split_path(target.key)
        self._where = {"Bucket": bucket, "Key": key}
        self._first_part = first_part
        self._in_flight = in_flight
        self._size = 0
        self._buffer = bytearray()  # the part being filled (allocated by the first write)
        self._filled = 0
        self._upload_id: str | None = None
        self._sent = 0  # parts handed to the uploaders
        self._finished = False
        self._changed = threading.Condition()
        # guarded by _changed: buffers free for reuse, buffers alive, parts running,
        # the parts' ETags, the first error of a part
        self._free: list[bytearray] = []
        self._buffers = 0
        self._running = 0
        self._etags: dict[int, str] = {}
        self._failure: BaseException | None = None
        self._pool: ThreadPoolExecutor | None = None

    # -- the stream -----------------------------------------------------------------------------
    def writable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._size

    def flush(self) -> None:
        """Nothing to do: parts go up when they are full, the rest on :meth:`complete`."""

    def write(self, data: Any) -> int:
        """Append ``data`` (any contiguous buffer); full parts go up in the background. A
        part that failed is raised here (the writer stops at once)."""
        if self._finished:
            raise ValueError(f"the upload to {str(self._target)!r} is already finished")
        self._raise_failure()
        view = memoryview(data).cast("B")
        count = len(view)
        while view:
            if not self._buffer:
                self._buffer = self._take_buffer(part_size(self._sent + 1, self._first_part))
            start = self._filled
            taken = min(len(self._buffer) - start, len(view))
            self._buffer[start:start + taken] = view[:taken]
            self._filled += taken
            view = view[taken:]
            if self._filled == len(self._buffer):
                self._send(self._buffer)
        self._size += count
        return count

    # -- publication ----------------------------------------------------------------------------
    def complete(self) -> None:
        """Publish what was written as the object: one PUT if no part was full, else the last
        part, then (every part done) the completion. Raises what failed."""
        self._raise_failure()
        self._finished = True
        store, target, where = self._store, self._target, self._where
        fs = store.fs
        buffer, filled = self._buffer, self._filled
        self._buffer, self._filled = bytearray(), 0
        if filled < len(buffer):
            del buffer[filled:]  # the last part's bytes, in place
        if self._upload_id is None:
            store.call("upload to", target,
                       lambda: fs.call_s3("put_object", **where, Body=buffer),
                       store.settings.transfer_deadline(filled))
        else:
            if filled:
                self._send(buffer)
            with self._changed:
                while self._running:
                    self._changed.wait()
            self._raise_failure()
            parts = [{"PartNumber": number, "ETag": self._etags[number]}
                     for number in range(1, self._sent + 1)]
            upload_id = self._upload_id
            store.call("completion of the upload to", target,
                       lambda: fs.call_s3("complete_multipart_upload", **where,
                                          UploadId=upload_id, MultipartUpload={"Parts": parts}))
            self._upload_id = None
        self._shut_down()
        fs.invalidate_cache(target.key)  # s3fs caches listings: the new object must show

    def abort(self) -> None:
        """Drop everything: no part is sent any more, the parts already up are discarded (a
        failure of the abort itself is logged; the incomplete upload stays invisible and is
        aborted at the next start). Never raises."""
        self._finished = True
        with self._changed:
            self._failure = self._failure or RemoteStorageError(
                f"the upload to {str(self._target)!r} was aborted")
            self._changed.notify_all()
        self._shut_down()
        self._buffer, self._free = bytearray(), []
        upload_id, self._upload_id = self._upload_id, None
        if upload_id is None:
            return
        fs = self._store.fs
        try:  # one attempt: a failure is already on its way, and the next start cleans up
            self._store.call("abort of the upload to", self._target,
                             lambda: fs.call_s3("abort_multipart_upload", **self._where,
                                                UploadId=upload_id), retries=0)
        except Exception as error:
            _LOGGER.warning("could not abort the incomplete upload to %s (%s): %s; it is not "
                            "visible as an object and is aborted when an auto-saver of this "
                            "prefix next starts", self._target, upload_id, error)

    # -- the parts ------------------------------------------------------------------------------
    def _raise_failure(self) -> None:
        with self._changed:
            failure = self._failure
        if failure is not None:
            raise failure

    def _take_buffer(self, size: int) -> bytearray:
        """A buffer of ``size`` bytes: a free one, a new one while fewer than
        ``in_flight + 1`` exist, else the next one a finished part frees."""
        with self._changed:
            while True:
                if self._failure is not None:
                    raise self._failure
                while self._free and len(self._free[-1]) != size:  # the part size grew
                    self._free.pop()
                    self._buffers -= 1
                if self._free:
                    return self._free.pop()
                if self._buffers <= self._in_flight:
                    self._buffers += 1
                    return bytearray(size)
                self._changed.wait()

    def _send(self, buffer: bytearray) -> None:
        """Hand the part in ``buffer`` to an uploader (the upload is begun first)."""
        self._buffer, self._filled = bytearray(), 0
        number = self._sent + 1
        if number > MAX_PARTS:
            raise RemoteStorageError(
                f"the upload to {str(self._target)!r} needs more than {MAX_PARTS} parts "
                f"({self._size} bytes so far): above the object size S3 allows")
        if self._upload_id is None:
            fs, where = self._store.fs, self._where
            answer = self._store.call("start of the upload to", self._target,
                                      lambda: fs.call_s3("create_multipart_upload", **where))
            self._upload_id = str(answer["UploadId"])
            self._pool = ThreadPoolExecutor(self._in_flight,
                                            thread_name_prefix="nnhandler-upload")
        assert self._pool is not None
        with self._changed:
            self._running += 1
        self._sent = number
        self._pool.submit(self._upload_part, number, buffer, self._upload_id)

    def _upload_part(self, number: int, buffer: bytearray, upload_id: str) -> None:
        store, fs, where = self._store, self._store.fs, self._where
        attempts = 0

        def put() -> Any:
            nonlocal attempts
            attempts += 1
            return fs.call_s3("upload_part", **where, UploadId=upload_id, PartNumber=number,
                              Body=buffer)

        answer: Any = None
        failure: BaseException | None = None
        with self._changed:
            skip = self._failure is not None  # aborted, or another part failed
        if not skip:
            try:
                answer = store.call(f"upload of part {number} to", self._target, put,
                                    store.settings.transfer_deadline(len(buffer)))
            except BaseException as error:
                failure = error
        with self._changed:
            self._running -= 1
            if failure is not None:
                self._failure = self._failure or failure
            elif not skip:
                self._etags[number] = str(answer["ETag"])
            # an attempt that ran past its deadline may still be sending this buffer: it is
            # reused only when the first attempt answered
            if attempts == 1 and len(buffer) == part_size(number, self._first_part):
                self._free.append(buffer)
            else:
                self._buffers -= 1
            self._changed.notify_all()

    def _shut_down(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
