"""Which failures are the user's disk (one line, exit 2) and which stay programming errors (a traceback)."""

import errno

import pytest
import torch

from selfsup.errors import exits_cleanly, is_user_os_error, user_errno


class SafetensorError(Exception):
    """Named as safetensors' writer error, which carries the OS error only in its text."""


@pytest.mark.parametrize(
    "err",
    [
        RuntimeError("cache file: No space left on device"),  # a message quoting an OS error's words
        ValueError("Permission denied is not a valid mode"),
        KeyError("File exists"),
        RuntimeError("worker died (os error 28)"),  # the code, but not from a writer that hides it
        ValueError("16 requested and 8 written"),
        OSError(errno.ENOENT, "No such file or directory"),  # a missing file: the program's to explain
    ],
)
def test_text_that_looks_like_an_os_error_is_not_the_users_disk(err, capsys):
    assert user_errno(err) is None and not is_user_os_error(err)

    @exits_cleanly
    def main():
        raise err

    with pytest.raises(type(err)):  # a traceback, not a one-line refusal
        main()


@pytest.mark.parametrize(
    ("err", "code"),
    [
        (OSError(errno.ENOSPC, "No space left on device"), errno.ENOSPC),
        (SafetensorError("Error while serializing: I/O error: File too large (os error 27)"), errno.EFBIG),
        (RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534"), errno.EIO),
        (OSError("10000 requested and 16 written"), errno.EIO),  # numpy's tofile: no errno
    ],
)
def test_the_writers_that_hide_the_errno_are_still_the_users_disk(err, code):
    assert user_errno(err) == code


class _UnreadableDataset(torch.utils.data.Dataset):
    def __len__(self):
        return 1

    def __getitem__(self, index):
        raise PermissionError(errno.EACCES, "Permission denied", "data/x.jpg")


def test_a_disk_error_raised_in_a_dataloader_worker_keeps_its_errno():
    """torch re-raises a worker's exception as ``exc_type(text)``: the errno survives only in the text."""
    with pytest.raises(PermissionError) as caught:
        next(iter(torch.utils.data.DataLoader(_UnreadableDataset(), num_workers=1)))
    assert caught.value.errno is None and user_errno(caught.value) == errno.EACCES
    assert user_errno(RuntimeError(str(caught.value))) is None  # other types never read their text
