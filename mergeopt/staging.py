"""Folders written in full before anyone sees them: a hidden staging folder, then one rename.

Exports, model conversions and the zoo are written into ``.NAME.tmp-<8 hex>`` beside their
target and renamed into place when complete, so that an interrupted or failed write never
leaves something that looks finished; the staging folder is removed on any exception.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from mergeopt.errors import UserError

STAGING_MARK = ".tmp-"
"""In the name of every staging folder: ``.NAME.tmp-<8 hex>``."""


@contextmanager
def staged_folder(target: Path, *, replace: bool = False) -> Iterator[Path]:
    """A new, empty, hidden folder beside ``target`` (parents created) that becomes ``target``
    when the block ends without an exception, and is removed when it raises.

    An existing ``target`` folder is replaced only with ``replace``, and only after the new
    one is complete (it is renamed aside, the new one renamed in, then it is removed);
    without ``replace`` the final rename fails on an existing non-empty ``target``.
    """
    target = Path(target)
    token = uuid.uuid4().hex[:8]
    staging = target.parent / f".{target.name}{STAGING_MARK}{token}"
    try:
        staging.mkdir(parents=True)
    except OSError as error:  # a file where a parent folder should be, no permission, ...
        raise UserError(f"{target}: cannot write a folder there ({error.strerror})") from None
    try:
        yield staging
        if replace and target.exists():
            retired = target.parent / f".{target.name}.old-{token}"
            os.replace(target, retired)
            os.replace(staging, target)
            shutil.rmtree(retired, ignore_errors=True)
        else:
            os.replace(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
